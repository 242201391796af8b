// Images waiting for the next prompt: from the file picker, drag and drop, paste (read as data: URLs) or a URL.
import { $, el, status } from "./dom.js";
import { imageThumb } from "./pane.js";

const waiting = []; // {url, name}
let reading = 0; // files still being read: the prompt waits for them
let onChange = () => {};

export const attachments = {
  get reading() {
    return reading > 0;
  },
  // the image parts to send, emptied
  take() {
    const parts = waiting.map((a) => ({ type: "image_url", image_url: { url: a.url } }));
    waiting.length = 0;
    render();
    return parts;
  },
  get count() {
    return waiting.length;
  },
};

export function watchAttachments(callback) {
  onChange = callback;
}

function render() {
  $("attachments").replaceChildren(
    ...waiting.map((a, i) => {
      const remove = el("button", {
        type: "button",
        className: "icon",
        testid: "remove-attachment",
        "aria-label": `Remove image ${a.name}`,
        text: "✕",
      });
      remove.addEventListener("click", () => {
        waiting.splice(i, 1);
        render();
      });
      return el("li", { testid: "attachment" }, imageThumb(a.url), remove);
    }),
  );
  onChange();
}

function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      status(`${file.name} is not an image`);
      continue;
    }
    const reader = new FileReader();
    reading++;
    reader.onloadend = () => {
      reading--;
      if (reader.result) waiting.push({ url: reader.result, name: file.name });
      else status(`Cannot read ${file.name}`);
      render();
    };
    reader.readAsDataURL(file);
  }
  onChange();
}

function attachURL() {
  const input = $("image-url");
  const url = input.value.trim();
  if (!url) return;
  if (!/^(https?:|data:image\/)/i.test(url)) {
    status("An image URL starts with http://, https:// or data:image/");
    return;
  }
  waiting.push({ url, name: url });
  input.value = "";
  render();
}

$("image-input").addEventListener("change", (event) => {
  attachFiles(event.target.files);
  event.target.value = "";
});
$("add-image-url").addEventListener("click", attachURL);
$("image-url").addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    attachURL();
  }
});
$("prompt").addEventListener("paste", (event) => {
  const files = [...((event.clipboardData && event.clipboardData.files) || [])];
  if (files.length) {
    event.preventDefault();
    attachFiles(files);
  }
});
const composer = $("composer");
composer.addEventListener("dragover", (event) => {
  event.preventDefault();
  composer.classList.add("dropping");
});
composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
composer.addEventListener("drop", (event) => {
  event.preventDefault();
  composer.classList.remove("dropping");
  attachFiles(event.dataTransfer.files);
});
