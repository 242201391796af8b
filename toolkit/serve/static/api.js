// The server's API as the page uses it: the key (this page's memory only: never storage, never the URL), JSON and
// blob reads, and server-sent events over fetch (EventSource can neither POST nor send the key).

export const auth = { key: null };

export function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (auth.key) h.Authorization = `Bearer ${auth.key}`;
  return h;
}

export async function httpError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    /* not JSON: keep the status line */
  }
  const error = new Error(message);
  error.status = response.status;
  return error;
}

async function get(path) {
  const response = await fetch(path, { headers: headers(false) });
  if (!response.ok) throw await httpError(response);
  return response;
}

export const getJSON = async (path) => (await get(path)).json();
export const getBlob = async (path) => (await get(path)).blob();

function dataOf(event) {
  return event
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""))
    .join("\n");
}

// Calls `onChunk` with each event's JSON until [DONE] or the end of the body; stops reading if it throws.
export async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const each = (event) => {
    const data = dataOf(event);
    if (data === "[DONE]") return false;
    if (data) onChunk(JSON.parse(data));
    return true;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value, { stream: !done }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!each(event)) return;
      }
      if (done) {
        if (buffer.trim()) each(buffer);
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
