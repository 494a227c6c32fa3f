"""Human feedback: a local pairwise-comparison page, a durable SQLite store, and export.

    fastrlhf label --data PAIRS.jsonl --db PREFS.sqlite [--port 8000] [--host 127.0.0.1]
    fastrlhf label --db PREFS.sqlite --export PREFS.jsonl

PAIRS.jsonl lines: {"prompt", "a", "b"} (optional "id"; other fields kept as metadata), e.g.
from `fastrlhf pairs`. The page shows the prompt and the two responses side by side with
buttons and keys for A / B / tie / skip. Its HTTP API:
    GET  /api/next     -> 200 {"id", "prompt", "a", "b", "answered", "total"}, or 204 when none remain
    POST /api/choice   {"id", "choice": "a" | "b" | "tie" | "skip"} -> 200 {"answered", "total"}
                       unknown id 404, bad JSON / choice 400, already answered 409: never a 500
Every choice is committed (SQLite, WAL journal) before the reply. A pair handed out by /api/next
is leased to that page for LEASE_S seconds, so people labelling at once get different pairs; a
restart keeps every answer and never serves an answered pair again (the pair id is the primary
key of the answers table: a second answer to the same pair is refused, not duplicated).
Export writes {"prompt", "chosen", "rejected"} lines, the format `fastrlhf rm` / `dpo` read;
ties and skips are left out and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fastrlhf import data
from fastrlhf.runtime import write_atomic

CHOICES = ("a", "b", "tie", "skip")
LEASE_S = 300.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY, prompt TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}', position INTEGER NOT NULL, leased_until REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY REFERENCES pairs(id), choice TEXT NOT NULL, created REAL NOT NULL);
"""


class Store:
    """The pairs and the answers in one SQLite file; safe to use from many threads (one
    connection per call, writes in IMMEDIATE transactions)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self):
        """A fresh connection (closed after use); transactions are explicit (BEGIN IMMEDIATE)."""
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged answer survives a power cut
            yield db
        finally:
            db.close()

    def add_pairs(self, records: list[dict]) -> int:
        """Insert pairs (ids kept, or derived from the content); already present ones are left
        alone. Returns how many were new."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            start = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM pairs").fetchone()[0]
            before = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
            for i, r in enumerate(records):
                meta = {k: v for k, v in r.items() if k not in ("id", "prompt", "a", "b")}
                db.execute("INSERT OR IGNORE INTO pairs (id, prompt, a, b, meta, position) VALUES (?,?,?,?,?,?)",
                           (r["id"], r["prompt"], r["a"], r["b"], json.dumps(meta), start + i))
            after = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
            db.execute("COMMIT")
        return after - before

    def progress(self, db=None) -> dict:
        """{"answered", "total"}."""
        if db is None:
            with self._connect() as db:
                return self.progress(db)
        total = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        answered = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        return {"answered": answered, "total": total}

    def next_pair(self) -> dict | None:
        """The first unanswered pair not leased to someone else; leased to the caller."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id, prompt, a, b FROM pairs WHERE leased_until < ? AND id NOT IN (SELECT id FROM answers) "
                "ORDER BY position LIMIT 1", (now,)).fetchone()
            if row is not None:
                db.execute("UPDATE pairs SET leased_until = ? WHERE id = ?", (now + LEASE_S, row[0]))
            db.execute("COMMIT")
            if row is None:
                return None
            return {"id": row[0], "prompt": row[1], "a": row[2], "b": row[3], **self.progress(db)}

    def answer(self, pair_id: str, choice: str) -> tuple[int, dict]:
        """(HTTP status, body) for an answer; committed before returning."""
        if choice not in CHOICES:
            return 400, {"error": f"choice must be one of {list(CHOICES)}, got {choice!r}"}
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                db.execute("ROLLBACK")
                return 404, {"error": f"no pair with id {pair_id!r}"}
            try:
                db.execute("INSERT INTO answers (id, choice, created) VALUES (?,?,?)", (pair_id, choice, time.time()))
            except sqlite3.IntegrityError:
                db.execute("ROLLBACK")
                return 409, {"error": f"pair {pair_id!r} is already answered"}
            db.execute("COMMIT")
            return 200, self.progress(db)

    def export(self, out: str | Path) -> dict:
        """{"prompt", "chosen", "rejected"} lines for the a/b answers, written atomically."""
        with self._connect() as db:
            rows = db.execute("SELECT p.prompt, p.a, p.b, x.choice FROM answers x JOIN pairs p ON p.id = x.id "
                              "ORDER BY p.position").fetchall()
        lines, counts = [], {c: 0 for c in CHOICES}
        for prompt, a, b, choice in rows:
            counts[choice] += 1
            if choice in ("a", "b"):
                chosen, rejected = (a, b) if choice == "a" else (b, a)
                lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
        write_atomic(Path(out), "".join(lines))
        return {"exported": len(lines), "ties": counts["tie"], "skips": counts["skip"]}


def load_pairs(path: str | Path) -> list[dict]:
    """PAIRS.jsonl / parquet records with string prompt, a, b; id from the record or the content."""
    out, seen = [], {}
    for where, rec in data.read_records(path):
        for key in ("prompt", "a", "b"):
            if key not in rec:
                raise data.DataError(f"{where}: missing field {key!r} (a pair needs prompt, a, b)")
            if not isinstance(rec[key], str):
                raise data.DataError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
        pid = str(rec.get("id") or hashlib.sha256(json.dumps([rec["prompt"], rec["a"], rec["b"]]).encode()).hexdigest()[:16])
        if pid in seen:
            raise data.DataError(f"{where}: pair id {pid!r} was already used at {seen[pid]} (ids must be unique; "
                                 "drop the field to derive ids from the content)")
        seen[pid] = where
        out.append(dict(rec, id=pid))
    if not out:
        raise data.DataError(f"{path}: no pairs")
    return out


# ----------------------------------------------------------------------------------------
# the page and the HTTP server
# ----------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fastrlhf: which response is better?</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2228; }
 header { display: flex; justify-content: space-between; padding: 10px 22px; background: #1d2228; color: #fff; }
 main { max-width: 1200px; margin: 0 auto; padding: 16px 22px; }
 .prompt, .resp { background: #fff; border: 1px solid #d5d9df; border-radius: 8px; padding: 12px 16px; }
 .cols { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; margin-top: 14px; }
 h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .05em; color: #5b6470; margin: 0 0 6px; }
 .text { white-space: pre-wrap; overflow-wrap: anywhere; }
 pre { background: #1d2228; color: #e8eaed; padding: 10px; border-radius: 6px; overflow-x: auto; white-space: pre; }
 code { font-family: ui-monospace, monospace; font-size: 13px; }
 .buttons { display: flex; gap: 10px; justify-content: center; margin: 18px 0; }
 button { font-size: 15px; padding: 9px 18px; border-radius: 6px; border: 1px solid #9aa3ad; background: #fff; cursor: pointer; }
 button.pick { background: #2857d6; color: #fff; border-color: #2857d6; }
 kbd { font-size: 11px; border: 1px solid #bbb; border-radius: 3px; padding: 0 4px; margin-left: 6px; }
 #status { text-align: center; color: #5b6470; min-height: 1.4em; }
</style></head>
<body>
<header><b>Which response is better?</b><span id="progress">…</span></header>
<main>
 <div class="prompt"><h2>Prompt</h2><div id="prompt" class="text"></div></div>
 <div class="cols">
  <div class="resp"><h2>Response A</h2><div id="a" class="text"></div></div>
  <div class="resp"><h2>Response B</h2><div id="b" class="text"></div></div>
 </div>
 <div class="buttons">
  <button class="pick" id="choose-a" onclick="choose('a')">A is better<kbd>1</kbd></button>
  <button id="choose-tie" onclick="choose('tie')">Tie<kbd>3</kbd></button>
  <button id="choose-skip" onclick="choose('skip')">Skip<kbd>0</kbd></button>
  <button class="pick" id="choose-b" onclick="choose('b')">B is better<kbd>2</kbd></button>
 </div>
 <div id="status"></div>
</main>
<script>
let current = null, busy = false;
function esc(s) { return s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c])); }
function render(s) {  // readable markdown: fenced code blocks, inline code, bold
  return esc(s).split(/```[\\w-]*\\n?/).map((part, i) => i % 2
    ? '<pre><code>' + part + '</code></pre>'
    : part.replace(/`([^`]+)`/g, '<code>$1</code>').replace(/\\*\\*([^*]+)\\*\\*/g, '<b>$1</b>')).join('');
}
function progress(p) { document.getElementById('progress').textContent = p.answered + ' / ' + p.total + ' answered'; }
async function next() {
  const r = await fetch('/api/next');
  if (r.status === 204) {
    current = null;
    document.getElementById('prompt').textContent = 'All pairs are answered. Thank you!';
    document.getElementById('a').textContent = ''; document.getElementById('b').textContent = '';
    return;
  }
  current = await r.json();
  for (const k of ['prompt', 'a', 'b']) document.getElementById(k).innerHTML = render(current[k]);
  progress(current);
}
async function choose(choice) {
  if (!current || busy) return;
  busy = true;
  const r = await fetch('/api/choice', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                        body: JSON.stringify({id: current.id, choice: choice})});
  const body = await r.json();
  document.getElementById('status').textContent = r.ok ? 'saved: ' + choice : body.error;
  if (r.ok) progress(body);
  busy = false;
  await next();
}
document.addEventListener('keydown', e => {
  const k = {'1': 'a', 'ArrowLeft': 'a', '2': 'b', 'ArrowRight': 'b', '3': 'tie', 'ArrowDown': 'tie', '0': 'skip', 's': 'skip'}[e.key];
  if (k) { e.preventDefault(); choose(k); }
});
next();
</script></body></html>
"""


def make_server(store: Store, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # no line per request on stderr
            pass

        def _send(self, status: int, body=None, ctype="application/json"):
            payload = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            if payload:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if self.path == "/api/next":
                pair = store.next_pair()
                return self._send(204) if pair is None else self._send(200, pair)
            self._send(404, {"error": f"no route GET {self.path}"})

        def do_POST(self):
            if self.path != "/api/choice":
                return self._send(404, {"error": f"no route POST {self.path}"})
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
            except (ValueError, UnicodeDecodeError):
                return self._send(400, {"error": "the body must be JSON: {\"id\": ..., \"choice\": ...}"})
            if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(body.get("choice"), str):
                return self._send(400, {"error": "expected {\"id\": str, \"choice\": \"a\"|\"b\"|\"tie\"|\"skip\"}"})
            self._send(*store.answer(body["id"], body["choice"]))

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(store: Store, host="127.0.0.1", port=0) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a background thread (tests, notebooks); returns (server, base URL)."""
    server = make_server(store, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastrlhf label", description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="SQLite file of pairs and answers (created if missing)")
    p.add_argument("--data", help="PAIRS.jsonl to add to the database (already present pairs are kept)")
    p.add_argument("--export", help="write the answers as preference pairs to this JSONL and exit")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    store = Store(args.db)
    if args.export:
        counts = store.export(args.export)
        print(f"wrote {counts['exported']} preference pairs to {args.export} "
              f"(left out: {counts['ties']} ties, {counts['skips']} skips)")
        return 0
    if args.data:
        added = store.add_pairs(load_pairs(args.data))
        print(f"{args.data}: {added} new pairs", file=sys.stderr)
    prog = store.progress()
    if prog["total"] == 0:
        raise data.DataError(f"{args.db}: no pairs to label; pass --data PAIRS.jsonl")
    server = make_server(store, args.host, args.port)
    print(f"labelling {prog['answered']}/{prog['total']} answered: open http://{args.host}:{server.server_address[1]}/ "
          "(Ctrl-C to stop; every answer is already saved)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
