"""Human feedback: a local pairwise-comparison page, a durable SQLite store, and export.

    fastrlhf label --data PAIRS.jsonl --db PREFS.sqlite [--port 8000] [--host 127.0.0.1]
    fastrlhf label --db PREFS.sqlite --export PREFS.jsonl

PAIRS.jsonl lines: {"prompt", "a", "b"} (optional "id"; other fields kept as metadata), e.g.
from `fastrlhf pairs`. The page shows the prompt and the two responses side by side with
buttons and keys for A / B / tie / skip. Its HTTP API (every POST a JSON body, Content-Type
application/json):
    POST /api/next     {} -> 200 {"id", "prompt", "a", "b", "answered", "total"} (the pair is leased
                       to you), 200 {"waiting": n, "answered", "total"} when the n unanswered pairs
                       are all leased to others, 204 when every pair is answered
    POST /api/choice   {"id", "choice": "a" | "b" | "tie" | "skip", "labeller"?} -> 200 {"answered", "total"}
                       unknown id 404, bad JSON / choice 400, already answered 409, a body over
                       64 KiB 413, not JSON 415, a foreign Origin 403: never a 500
On loopback (the default) only this machine's own pages can use it: the Host header must be the
bound address (DNS rebinding fails), a POST must come from the page's own origin as JSON (other
sites cannot send one), and a plain GET changes nothing. With --host beyond loopback the printed
URL carries a random token every request must present (the page keeps it in a SameSite cookie),
the server warns that the page is reachable by others, and every answer records the name the
labeller gives. Requests are bounded: 64 KiB bodies, 15 s socket timeouts, 64 handler threads,
a 256-deep listen backlog.
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
import secrets
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fastrlhf import data
from fastrlhf.files import write_atomic

CHOICES = ("a", "b", "tie", "skip")
LEASE_S = 300.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY, prompt TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}', position INTEGER NOT NULL, leased_until REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY REFERENCES pairs(id), choice TEXT NOT NULL, created REAL NOT NULL,
    labeller TEXT NOT NULL DEFAULT '');
"""


class Store:
    """The pairs and the answers in one SQLite file; safe to use from many threads (one
    connection per call, writes in IMMEDIATE transactions)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(answers)")}
            if "labeller" not in columns:  # a database written before answers recorded who gave them
                db.execute("ALTER TABLE answers ADD COLUMN labeller TEXT NOT NULL DEFAULT ''")

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
        """The first unanswered pair not leased to someone else, leased to the caller; when the
        unanswered ones are all leased, {"waiting": how many, ...}; None when all are answered."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id, prompt, a, b FROM pairs WHERE leased_until < ? AND id NOT IN (SELECT id FROM answers) "
                "ORDER BY position LIMIT 1", (now,)).fetchone()
            if row is not None:
                db.execute("UPDATE pairs SET leased_until = ? WHERE id = ?", (now + LEASE_S, row[0]))
            db.execute("COMMIT")
            if row is not None:
                return {"id": row[0], "prompt": row[1], "a": row[2], "b": row[3], **self.progress(db)}
            waiting = db.execute("SELECT COUNT(*) FROM pairs WHERE id NOT IN (SELECT id FROM answers)").fetchone()[0]
            return {"waiting": waiting, **self.progress(db)} if waiting else None

    def answer(self, pair_id: str, choice: str, labeller: str = "") -> tuple[int, dict]:
        """(HTTP status, body) for an answer, recorded with who gave it; committed before returning."""
        if choice not in CHOICES:
            return 400, {"error": f"choice must be one of {list(CHOICES)}, got {choice!r}"}
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                db.execute("ROLLBACK")
                return 404, {"error": f"no pair with id {pair_id!r}"}
            try:
                db.execute("INSERT INTO answers (id, choice, created, labeller) VALUES (?,?,?,?)",
                           (pair_id, choice, time.time(), labeller))
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
        content = json.dumps([rec["prompt"], rec["a"], rec["b"]]).encode()
        pid = str(rec.get("id") or hashlib.sha256(content).hexdigest()[:16])
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
 button { font-size: 15px; padding: 9px 18px; border-radius: 6px; border: 1px solid #9aa3ad; background: #fff;
          cursor: pointer; }
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
let current = null, busy = false, retry = null;
const NEEDS_NAME = __NEEDS_NAME__;  // beyond loopback every answer records who gave it
let labeller = localStorage.getItem('fastrlhf-labeller') || '';
function esc(s) { return s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c])); }
function render(s) {  // readable markdown: fenced code blocks, inline code, bold
  return esc(s).split(/```[\\w-]*\\n?/).map((part, i) => i % 2
    ? '<pre><code>' + part + '</code></pre>'
    : part.replace(/`([^`]+)`/g, '<code>$1</code>').replace(/\\*\\*([^*]+)\\*\\*/g, '<b>$1</b>')).join('');
}
function progress(p) { document.getElementById('progress').textContent = p.answered + ' / ' + p.total + ' answered'; }
function status(text) { document.getElementById('status').textContent = text; }
function show(p, a, b) {
  document.getElementById('prompt').textContent = p;
  document.getElementById('a').textContent = a; document.getElementById('b').textContent = b;
}
async function post(path, body) {
  return fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
}
async function next() {  // never leaves the page stuck: errors are shown and retried
  clearTimeout(retry);
  try {
    const r = await post('/api/next', {});
    if (r.status === 204) { current = null; show('All pairs are answered. Thank you!', '', ''); status(''); return; }
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || ('HTTP ' + r.status));
    progress(body);
    if (body.waiting) {  // unanswered pairs remain, but others are labelling them now
      current = null;
      show(body.waiting + ' pairs are being labelled by others, retrying', '', '');
      retry = setTimeout(next, 5000);
      return;
    }
    current = body;
    for (const k of ['prompt', 'a', 'b']) document.getElementById(k).innerHTML = render(current[k]);
  } catch (e) {
    current = null;
    status('could not get the next pair (' + e.message + '); retrying');
    retry = setTimeout(next, 3000);
  }
}
async function choose(choice) {
  if (!current || busy) return;
  if (NEEDS_NAME && !labeller) {
    labeller = (prompt('Your name (it is saved with each of your answers):') || '').trim();
    if (!labeller) return;
    localStorage.setItem('fastrlhf-labeller', labeller);
  }
  busy = true;
  try {
    const r = await post('/api/choice', {id: current.id, choice: choice, labeller: labeller});
    const body = await r.json().catch(() => ({error: 'HTTP ' + r.status}));
    status(r.ok ? 'saved: ' + choice : body.error);
    if (r.ok) progress(body);
  } catch (e) {
    status('not saved (' + e.message + '): choose again');
    busy = false;
    return;
  }
  busy = false;
  await next();
}
document.addEventListener('keydown', e => {
  const k = {'1': 'a', 'ArrowLeft': 'a', '2': 'b', 'ArrowRight': 'b', '3': 'tie', 'ArrowDown': 'tie',
             '0': 'skip', 's': 'skip'}[e.key];
  if (k) { e.preventDefault(); choose(k); }
});
next();
</script></body></html>
"""


MAX_BODY = 64 * 1024  # bytes of a request body (an answer is ~100)
MAX_THREADS = 64  # requests handled at once; more are answered 503 at once
SOCKET_TIMEOUT_S = 15.0  # a client that stalls mid-request is dropped after this
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep listen backlog (40 clients at once overflowed the default
    of 5: 41% of connections were reset) and at most MAX_THREADS handler threads."""

    request_queue_size = 256
    daemon_threads = True

    def __init__(self, *args, **kw):
        self.slots = threading.BoundedSemaphore(MAX_THREADS)
        super().__init__(*args, **kw)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
                                b"Connection: close\r\n\r\n")
            finally:
                self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(store: Store, host: str = "127.0.0.1", port: int = 8000, token: str | None = None):
    """The page and its API. The security model: on loopback only this machine's own pages can
    use it (the Host header must name the bound address, so DNS rebinding fails; a POST must be
    application/json from the page's own origin, so other sites' forms and scripts fail; nothing
    a plain GET can trigger changes state). Beyond loopback a random token, in the printed URL,
    is required on every request (a cookie the page sets, or the X-Fastrlhf-Token header), and
    every answer records the labeller's name."""
    loopback = host in LOOPBACK
    if not loopback and not token:
        raise ValueError("a server beyond loopback needs a token")

    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT_S  # a stalled Content-Length: 1e10 does not hold a thread

        def log_message(self, *args):  # no line per request on stderr
            pass

        def _send(self, status: int, body=None, ctype="application/json", cookie: str | None = None):
            payload = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            if payload:
                self.send_header("Content-Type", ctype)
            if cookie:
                self.send_header("Set-Cookie", cookie)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.end_headers()
            self.wfile.write(payload)

        def _refused(self) -> bool:
            """Answer and return True when the request may not be served."""
            port = self.server.server_address[1]
            if loopback:
                allowed = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}
                if self.headers.get("Host", "") not in allowed:
                    self._send(421, {"error": "unexpected Host header: open the page at http://127.0.0.1:"
                                              f"{port}/"})
                    return True
            elif not self._has_token():
                self._send(403, {"error": "this server needs the token in the URL it printed (?token=...)"})
                return True
            return False

        def _has_token(self) -> bool:
            import hmac
            from http.cookies import SimpleCookie

            given = self.headers.get("X-Fastrlhf-Token")
            if given is None:
                jar = SimpleCookie(self.headers.get("Cookie", ""))
                given = jar["fastrlhf_token"].value if "fastrlhf_token" in jar else ""
            return hmac.compare_digest(given.encode(), token.encode())

        def do_GET(self):
            from urllib.parse import parse_qs, urlsplit

            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                cookie = None
                if not loopback:  # the printed URL carries the token: keep it in a strict cookie
                    import hmac

                    given = parse_qs(url.query).get("token", [""])[0]
                    if not (given and hmac.compare_digest(given.encode(), token.encode())) and not self._has_token():
                        return self._send(403, {"error": "open the URL the server printed: it carries the token"})
                    cookie = f"fastrlhf_token={token}; Path=/; HttpOnly; SameSite=Strict"
                elif self._refused():
                    return
                page = PAGE.replace("__NEEDS_NAME__", "false" if loopback else "true")
                return self._send(200, page.encode(), "text/html; charset=utf-8", cookie=cookie)
            if self._refused():
                return
            if url.path == "/api/next":
                return self._send(405, {"error": "POST /api/next (it leases a pair to you)"})
            self._send(404, {"error": f"no route GET {url.path}"})

        def _json_body(self):
            """The request's JSON body, or None after answering the error."""
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                self._send(415, {"error": "the body must be sent as Content-Type: application/json"})
                return None
            origin = self.headers.get("Origin")
            if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
                self._send(403, {"error": f"requests from {origin} are not accepted"})
                return None
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if n < 0 or n > MAX_BODY:
                self._send(413, {"error": f"the body must be at most {MAX_BODY} bytes"})
                return None
            try:
                return json.loads(self.rfile.read(n) or b"{}")
            except (ValueError, UnicodeDecodeError, RecursionError):
                self._send(400, {"error": "the body must be JSON: {\"id\": ..., \"choice\": ...}"})
                return None
            except OSError:  # the client stalled past the socket timeout
                self.close_connection = True
                return None

        def do_POST(self):
            if self._refused():
                return
            if self.path not in ("/api/next", "/api/choice"):
                return self._send(404, {"error": f"no route POST {self.path}"})
            body = self._json_body()
            if body is None:
                return
            if self.path == "/api/next":
                pair = store.next_pair()
                return self._send(204) if pair is None else self._send(200, pair)
            if not (isinstance(body, dict) and isinstance(body.get("id"), str)
                    and isinstance(body.get("choice"), str)):
                return self._send(400, {"error": "expected {\"id\": str, \"choice\": \"a\"|\"b\"|\"tie\"|\"skip\"}"})
            who = body.get("labeller", "")
            if not isinstance(who, str) or len(who) > 100:
                return self._send(400, {"error": "labeller must be a name of at most 100 characters"})
            if not loopback and not who.strip():
                return self._send(400, {"error": "say who you are: the page asks for your name once"})
            self._send(*store.answer(body["id"], body["choice"], who.strip()))

    return _BoundedServer((host, port), Handler)


def serve_in_thread(store: Store, host="127.0.0.1", port=0, token=None) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a background thread (tests, notebooks); returns (server, base URL)."""
    server = make_server(store, host, port, token)
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
    token = None if args.host in LOOPBACK else secrets.token_urlsafe(16)
    server = make_server(store, args.host, args.port, token)
    url = f"http://{args.host}:{server.server_address[1]}/" + (f"?token={token}" if token else "")
    if token:
        print(f"warning: --host {args.host} makes the page reachable by others on the network; anyone with this "
              "URL (its token) can label, and each answer records the name they give", file=sys.stderr)
    print(f"labelling {prog['answered']}/{prog['total']} answered: open {url} "
          "(Ctrl-C to stop; every answer is already saved)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
