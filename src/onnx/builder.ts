import onnxProto from "onnx-proto";
import type { StoredWeight } from "./weight_cache.ts";

const { onnx } = onnxProto;
const DataType = onnx.TensorProto.DataType;
const AttrType = onnx.AttributeProto.AttributeType;

export type ElemType = "float32" | "float16" | "int64" | "int32" | "bool" | "uint8" | "int8";

const ELEM: Record<ElemType, number> = {
  float32: DataType.FLOAT,
  float16: DataType.FLOAT16,
  int64: DataType.INT64,
  int32: DataType.INT32,
  bool: DataType.BOOL,
  uint8: DataType.UINT8,
  int8: DataType.INT8,
};

/** One external-data file: a weight under the path its initializer names. */
export interface ExternalFile {
  path: string;
  weight: StoredWeight;
}

/**
 * A graph and its weights, as onnxruntime takes them. A protobuf is capped at 2 GiB, so every weight
 * lives outside it as external data, one file per weight: each is the weight cache's own entry (its
 * bytes or its file), so creating a session never concatenates a copy of the model.
 */
export interface EncodedModel {
  /** The ModelProto: nodes, small constants, and references to the files in `weights`. */
  graph: Uint8Array;
  weights: ExternalFile[];
  /** Weights the graph takes as inputs instead (GraphBuilder's `weightsAsInputs`), by input name. */
  weightInputs: Map<string, StoredWeight>;
}

export function storedBytes(model: EncodedModel): number {
  let bytes = model.weights.reduce((sum, f) => sum + f.weight.byteLength, 0);
  for (const w of model.weightInputs.values()) bytes += w.byteLength;
  return bytes;
}

/** A dimension is a fixed size or a named symbolic one (onnxruntime checks names for consistency). */
export type Dim = number | string;

export type AttrValue =
  | number
  | number[]
  | string
  | { float: number }
  | { floats: number[] }
  | { tensor: onnxProto.onnx.ITensorProto };

function attribute(name: string, value: AttrValue): onnxProto.onnx.IAttributeProto {
  if (typeof value === "string") return { name, type: AttrType.STRING, s: new TextEncoder().encode(value) };
  if (Array.isArray(value)) return { name, type: AttrType.INTS, ints: value };
  if (typeof value === "number") return { name, type: AttrType.INT, i: value };
  if ("float" in value) return { name, type: AttrType.FLOAT, f: value.float };
  if ("tensor" in value) return { name, type: AttrType.TENSOR, t: value.tensor };
  return { name, type: AttrType.FLOATS, floats: value.floats };
}

function valueInfo(name: string, elem: ElemType, dims: Dim[]): onnxProto.onnx.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: ELEM[elem],
        shape: { dim: dims.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

/**
 * A small imperative front end over onnx-proto: every node call returns the name(s) of its outputs,
 * so graph code reads like the math it implements.
 */
export class GraphBuilder {
  private readonly nodes: onnxProto.onnx.INodeProto[] = [];
  private readonly initializers: onnxProto.onnx.ITensorProto[] = [];
  private readonly inputs: onnxProto.onnx.IValueInfoProto[] = [];
  private readonly outputs: onnxProto.onnx.IValueInfoProto[] = [];
  private counter = 0;
  private readonly constCache = new Map<string, string>();
  private readonly external: ExternalFile[] = [];
  private readonly weightInputs = new Map<string, StoredWeight>();

  /** `weightsAsInputs`: weights become graph inputs the caller binds, not initializers (see EncodedModel). */
  constructor(private readonly weightsAsInputs = false) {}

  /** A fresh value name. */
  name(prefix: string): string {
    return `${prefix}_${this.counter++}`;
  }

  input(name: string, elem: ElemType, dims: Dim[]): string {
    this.inputs.push(valueInfo(name, elem, dims));
    return name;
  }

  output(name: string, elem: ElemType, dims: Dim[]): void {
    this.outputs.push(valueInfo(name, elem, dims));
  }

  /** A weight initializer stored as its own external-data file, named after it. */
  weight(name: string, w: StoredWeight): string {
    if (this.weightsAsInputs) {
      if (!this.weightInputs.has(name)) this.input(name, w.elem, w.dims);
      this.weightInputs.set(name, w);
      return name;
    }
    const path = `${name}.bin`;
    this.external.push({ path, weight: w });
    this.initializers.push({
      name,
      dims: w.dims,
      dataType: ELEM[w.elem],
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: "location", value: path },
        { key: "offset", value: "0" },
        { key: "length", value: String(w.byteLength) },
      ],
    });
    return name;
  }

  /** An int64 constant, shared between all uses of the same values. */
  ints(values: number[], scalar = false): string {
    const key = `i64:${scalar}:${values.join(",")}`;
    const hit = this.constCache.get(key);
    if (hit) return hit;
    const name = this.name("const_i64");
    const data = new BigInt64Array(values.map((v) => BigInt(v)));
    this.initializers.push({
      name,
      dims: scalar ? [] : [values.length],
      dataType: DataType.INT64,
      rawData: new Uint8Array(data.buffer),
    });
    this.constCache.set(key, name);
    return name;
  }

  /** A uint8 scalar constant (a zero point), shared between all uses of the same value. */
  byte(value: number): string {
    const key = `u8:${value}`;
    const hit = this.constCache.get(key);
    if (hit) return hit;
    const name = this.name("const_u8");
    this.initializers.push({ name, dims: [], dataType: DataType.UINT8, rawData: Uint8Array.of(value) });
    this.constCache.set(key, name);
    return name;
  }

  /** A float scalar constant (rank 0) for broadcasting, in the activations' type. */
  scalar(value: number, elem: "float32" | "float16" = "float32"): string {
    const key = `${elem}:${value}`;
    const hit = this.constCache.get(key);
    if (hit) return hit;
    const name = this.name("const_f");
    const data = elem === "float32" ? new Float32Array([value]) : new Float16Array([value]);
    this.initializers.push({
      name,
      dims: [],
      dataType: ELEM[elem],
      rawData: new Uint8Array(data.buffer),
    });
    this.constCache.set(key, name);
    return name;
  }

  node(
    op: string,
    inputs: string[],
    attrs: Record<string, AttrValue> = {},
    outputs?: string[] | number,
    domain = "",
  ): string[] {
    const outs = Array.isArray(outputs)
      ? outputs
      : Array.from({ length: outputs ?? 1 }, () => this.name(op.toLowerCase()));
    this.nodes.push({
      opType: op,
      domain,
      name: this.name(`n_${op}`),
      input: inputs,
      output: outs,
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
    });
    return outs;
  }

  /** Single-output shorthand; `name` pins the output name (graph outputs). */
  op(op: string, inputs: string[], attrs: Record<string, AttrValue> = {}, name?: string): string {
    return this.node(op, inputs, attrs, name ? [name] : 1)[0];
  }

  /** The graph and its external weights. */
  encode(graphName: string, opset = 17): EncodedModel {
    return {
      graph: this.encodeGraph(graphName, opset),
      weights: [...this.external],
      weightInputs: new Map(this.weightInputs),
    };
  }

  private encodeGraph(graphName: string, opset: number): Uint8Array {
    const model = onnx.ModelProto.create({
      irVersion: 8,
      producerName: "fusedge",
      opsetImport: [{ domain: "", version: opset }, { domain: "com.microsoft", version: 1 }],
      graph: {
        name: graphName,
        node: this.nodes,
        initializer: this.initializers,
        input: this.inputs,
        output: this.outputs,
      },
    });
    return onnx.ModelProto.encode(model).finish();
  }

  get nodeCount(): number {
    return this.nodes.length;
  }

  countOps(op: string): number {
    return this.nodes.filter((n) => n.opType === op).length;
  }
}
