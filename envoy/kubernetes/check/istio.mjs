// Validates the rendered Istio objects against Istio's CRD schemas.
//
//     node istio.mjs NODE_MODULES FILE.json...
//
// The models of @kubernetes-models/istio (generated from Istio's CRDs) check types, enums and
// required fields, but accept fields the CRD does not know, which the API server would reject
// (strict field validation). So the fields each object may have are also read from the models'
// TypeScript declarations, and anything else is an error, except where the CRD itself leaves the
// content open (EnvoyFilter patch values are Envoy configuration: envoy_check.py validates them).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, ...files] = process.argv.slice(2);
const ts = createRequire(join(modules, "noop.js"))("typescript");
const istio = join(modules, "@kubernetes-models", "istio");

const OPEN = { open: true };

// The fields a type allows: { props: Map(name -> shape), index: shape, items: shape } or OPEN.
function shapeOf(node) {
  const S = ts.SyntaxKind;
  switch (node.kind) {
    case S.TypeLiteral: {
      if (node.members.length === 0) return OPEN; // x-kubernetes-preserve-unknown-fields
      const shape = { props: new Map() };
      for (const member of node.members) {
        if (member.kind === S.IndexSignature) shape.index = shapeOf(member.type);
        else shape.props.set(member.name.text, shapeOf(member.type));
      }
      return shape;
    }
    case S.ArrayType:
      return { items: shapeOf(node.elementType) };
    case S.TypeReference: {
      const name = node.typeName.getText();
      if (name === "Array") return { items: shapeOf(node.typeArguments[0]) };
      if (name === "Exclude") return shapeOf(node.typeArguments[0]);
      return OPEN; // e.g. IObjectMeta: checked by the model's own validator
    }
    case S.ParenthesizedType:
      return shapeOf(node.type);
    case S.UnionType:
    case S.IntersectionType: // oneOf branches: a field is known if any branch has it
      return node.types.map(shapeOf).reduce(merge);
    default:
      return {}; // a scalar: its type is the validator's business
  }
}

function merge(a, b) {
  if (a.open || b.open) return OPEN;
  const out = { ...a, ...b };
  if (a.props && b.props) {
    out.props = new Map(a.props);
    for (const [k, v] of b.props) out.props.set(k, out.props.has(k) ? merge(out.props.get(k), v) : v);
  }
  if (a.items && b.items) out.items = merge(a.items, b.items);
  if (a.index && b.index) out.index = merge(a.index, b.index);
  return out;
}

function unknownFields(value, shape, path, errors) {
  if (shape.open || value === null || typeof value !== "object") return errors;
  if (Array.isArray(value)) {
    if (shape.items) value.forEach((v, i) => unknownFields(v, shape.items, `${path}[${i}]`, errors));
    return errors;
  }
  for (const [key, v] of Object.entries(value)) {
    const field = shape.props?.get(key) ?? shape.index;
    if (field) unknownFields(v, field, `${path}.${key}`, errors);
    else if (shape.props || shape.index) errors.push(`${path}.${key}: unknown field`);
  }
  return errors;
}

function specShape(dir, kind) {
  const file = join(dir, `${kind}.d.ts`);
  const source = ts.createSourceFile(file, readFileSync(file, "utf8"), ts.ScriptTarget.Latest, true);
  const iface = source.statements.find((s) => s.kind === ts.SyntaxKind.InterfaceDeclaration && s.name.text === `I${kind}`);
  const spec = iface.members.find((m) => m.name.text === "spec");
  return shapeOf(spec.type);
}

let failures = 0;
for (const file of files) {
  const objects = JSON.parse(readFileSync(file, "utf8"));
  const valid = [];
  for (const object of objects) {
    const dir = join(istio, ...object.apiVersion.split("/"));
    const where = `${file}: ${object.kind}/${object.metadata?.name}`;
    const errors = [];
    try {
      const { [object.kind]: Model } = await import(pathToFileURL(join(dir, `${object.kind}.js`)).href);
      new Model(object).validate();
    } catch (error) {
      errors.push(error.message);
    }
    for (const key of Object.keys(object)) {
      if (!["apiVersion", "kind", "metadata", "spec"].includes(key)) errors.push(`${key}: unknown field`);
    }
    for (const key of Object.keys(object.metadata ?? {})) {
      if (!["name", "namespace", "labels", "annotations"].includes(key)) errors.push(`metadata.${key}: unexpected field`);
    }
    if (object.spec) unknownFields(object.spec, specShape(dir, object.kind), "spec", errors);
    if (errors.length) {
      failures += 1;
      console.error(`FAIL ${where}\n  ${errors.join("\n  ")}`);
    } else {
      valid.push(`${object.kind}/${object.metadata.name}`);
    }
  }
  if (valid.length) console.log(`Istio 1.29 CRD schemas (strict): ${file}: ${valid.join(", ")}`);
}
process.exit(failures ? 1 : 0);
