// The demo page: a chess study whose readers see each other's cursors, on the browser client.
// Fragment: #token=<JWT>&study=<id>[&urls=<base>,<base>][&hb=<ms>][&active=<ms>]
import { PresenceClient } from "/client/presence.js";

const CHAPTERS = [
  {
    id: "ch1",
    name: "Chapter 1: Giuoco Piano",
    moves: ["e4", "e5", "Nf3", "Nc6", "Bc4", "Bc5", "c3", "Nf6", "d4", "exd4"],
    variation: { at: 6, moves: ["Nf6", "d3", "d6"] },
  },
  {
    id: "ch2",
    name: "Chapter 2: Evans Gambit",
    moves: ["e4", "e5", "Nf3", "Nc6", "Bc4", "Bc5", "b4", "Bxb4", "c3", "Ba5"],
    variation: { at: 8, moves: ["Be7", "d4", "Na5"] },
  },
];

const params = new URLSearchParams(location.hash.slice(1));
const urls = (params.get("urls") || location.origin).split(",");
const numberParam = (name) => (params.has(name) ? Number(params.get(name)) : undefined);
const client = new PresenceClient({
  url: urls,
  studyId: params.get("study") || "demo-study",
  token: params.get("token"),
  heartbeatInterval: numberParam("hb"),
  activityTimeout: numberParam("active"),
  stableAfter: numberParam("stable"),
});
const events = [];
window.presence = { client, events }; // the browser tests read these

function colour(userId) {
  let hash = 0;
  for (const char of userId) hash = (hash * 31 + char.charCodeAt(0)) % 360;
  return `hsl(${hash}, 60%, 42%)`;
}

function renderChapters() {
  const root = document.getElementById("chapters");
  for (const chapter of CHAPTERS) {
    const section = document.createElement("div");
    section.className = "chapter";
    section.innerHTML = `<h2></h2><div class="moves"></div>`;
    section.querySelector("h2").textContent = chapter.name;
    const list = section.querySelector(".moves");
    chapter.moves.forEach((san, index) => {
      list.append(moveButton(chapter.id, `main.${index + 1}`, san, false));
      if (index + 1 === chapter.variation.at) {
        chapter.variation.moves.forEach((varSan, varIndex) => {
          const path = `main.${index + 1}.var1.${varIndex + 1}`;
          list.append(moveButton(chapter.id, path, `(${varSan})`, true));
        });
      }
    });
    root.append(section);
  }
}

function moveButton(chapterId, path, san, isVariation) {
  const button = document.createElement("span");
  button.className = isVariation ? "move var" : "move";
  button.dataset.chapter = chapterId;
  button.dataset.path = path;
  button.textContent = san;
  button.addEventListener("click", () => goTo(chapterId, path));
  return button;
}

let mine = null;
function goTo(chapterId, path) {
  mine = { chapterId, path };
  client.setCursor({ chapterId, movePath: path });
  render(client.users());
}

function render(users) {
  for (const move of document.querySelectorAll(".move")) {
    move.classList.toggle(
      "mine",
      mine !== null && move.dataset.chapter === mine.chapterId && move.dataset.path === mine.path,
    );
    for (const badge of move.querySelectorAll(".badge")) badge.remove();
  }
  const list = document.getElementById("users");
  list.replaceChildren();
  for (const user of users) {
    const item = document.createElement("li");
    item.dataset.user = user.user_id;
    item.dataset.status = user.status;
    item.innerHTML = `<span class="dot"></span><b></b> <small></small>`;
    item.querySelector(".dot").classList.add(user.status);
    item.querySelector("b").textContent = user.user_id;
    item.querySelector("small").textContent =
      `${user.status} · ${user.chapter_id || "-"} ${user.move_path || ""}`;
    list.append(item);
    if (user.user_id === client.userId) continue;
    const selector = `.move[data-chapter="${CSS.escape(user.chapter_id || "")}"][data-path="${CSS.escape(user.move_path || "")}"]`;
    const move = document.querySelector(selector);
    if (!move) continue;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.user = user.user_id;
    badge.style.background = colour(user.user_id);
    badge.textContent = user.user_id;
    move.append(badge);
  }
}

function log(kind, detail) {
  events.push({ kind, detail, at: Date.now() });
  const item = document.createElement("li");
  item.textContent = `${kind} ${detail?.user_id ?? JSON.stringify(detail)}`;
  const list = document.getElementById("log");
  list.prepend(item);
  while (list.children.length > 50) list.lastChild.remove();
}

// "alice is typing…": the client keeps who is typing (each until 5 s after their last signal).
function renderTyping(typing) {
  const names = typing.map((each) => each.user_id);
  const line = document.getElementById("typing");
  line.dataset.users = names.join(",");
  if (names.length === 0) line.textContent = "";
  else if (names.length === 1) line.textContent = `${names[0]} is typing…`;
  else line.textContent = `${names.slice(0, -1).join(", ")} and ${names.at(-1)} are typing…`;
}

function listenToNote() {
  const note = document.getElementById("note");
  note.addEventListener("input", () => {
    if (note.value) client.typing(); // at most one signal every 2 s, however fast the keys
    else client.stopTyping();
  });
  note.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !note.value) return;
    log("note", { user_id: client.userId, text: note.value });
    note.value = "";
    client.stopTyping();
  });
}

function step(delta) {
  const chapter = CHAPTERS.find((each) => each.id === (mine?.chapterId || "ch1"));
  const ply = Number((mine?.path || "main.0").split(".")[1]) + delta;
  if (ply >= 1 && ply <= chapter.moves.length) goTo(chapter.id, `main.${ply}`);
}

renderChapters();
listenToNote();
client.on("change", render);
client.on("typing", renderTyping);
for (const kind of ["join", "leave", "status", "cursor", "resync", "error"])
  client.on(kind, (detail) => log(kind, detail));
client.on("state", (state) => {
  const badge = document.getElementById("state");
  badge.textContent = state;
  badge.className = `state ${state}`;
  log("state", state);
});
document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement) return; // arrows move the caret in the note
  if (event.key === "ArrowRight") step(1);
  if (event.key === "ArrowLeft") step(-1);
});
client.connect().then(() => {
  document.getElementById("me").textContent = `you are ${client.userId}`;
  goTo("ch1", "main.1");
});
