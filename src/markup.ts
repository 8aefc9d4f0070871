/** Escapes text for XML/HTML content and double-quoted attributes (the dashboard and the SVGs). */
export function escapeXml(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}
