// "Copy as curl" and "Copy as Python (openai SDK)" of a pane's last request, exactly as sent. The key appears as
// $TOOLKIT_API_KEY, never its value.
import { auth } from "./api.js";

export function curlOf(body) {
  const key = auth.key ? ` \\\n  -H "Authorization: Bearer $TOOLKIT_API_KEY"` : "";
  return (
    `curl -N ${location.origin}/v1/chat/completions \\\n  -H "Content-Type: application/json"${key} \\\n` +
    `  -d @- <<'JSON'\n${JSON.stringify(body, null, 2)}\nJSON`
  );
}

function pyLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => inner + pyLiteral(v, inner)).join(",\n")},\n${indent}]`;
  }
  const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(v, inner)}`);
  return items.length ? `{\n${items.join(",\n")},\n${indent}}` : "{}";
}

export function pythonOf(body) {
  const args = Object.entries(body)
    .map(([k, v]) => `    ${k}=${pyLiteral(v, "    ")},`)
    .join("\n");
  const key = auth.key ? 'os.environ["TOOLKIT_API_KEY"]' : '"unused"';
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${key})`,
    `stream = client.chat.completions.create(\n${args}\n)`,
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "print()",
  ].join("\n");
}
