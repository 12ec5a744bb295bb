"""A story page in the browser: type an opening, set the sampling, watch the model write the rest.

    python serve.py --out_dir=out                   # then open http://localhost:8000
    python serve.py --out_dir=out-1m,out-15m        # several models side by side, same prompt

Serves one page (serve.html: plain HTML and JavaScript, no external files, so it works offline) and
GET /generate?model=0&prompt=...&temperature=0.8&top_k=0&top_p=0.95&max_new_tokens=256, which answers with
server-sent events (text/event-stream, https://html.spec.whatwg.org/multipage/server-sent-events.html): one
`data: {"text": ...}` event per piece of the story as it is written, then `data: {"done": true, "tokens": n,
"seconds": s}`. A bad request gets HTTP 400 with {"error": "..."}. Each model writes one story at a time (a
lock per model); other requests for it wait their turn. Only the standard library's http.server.

It listens on 127.0.0.1, reachable from this machine only, unless --host says otherwise (--host=0.0.0.0:
every network this machine is on, with no password).
"""

import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch

from checkpoint import load_model
from configurator import DTYPES, UserError, configure, resolve_device, run
from model import check_sampling
from tokenizer import StreamDecoder

# -----------------------------------------------------------------------------
out_dir = "out"                         # directory that holds the checkpoint; several separated by commas
checkpoint = "best_model_params.pt"     # file name inside each out_dir
host = "127.0.0.1"                      # 0.0.0.0 to accept connections from other machines
port = 8000                             # 0: any free port (printed at start)
max_new_tokens = 1000                   # the longest story a request may ask for, in tokens
device = "auto"                         # auto, cpu, mps, cuda, cuda:N
dtype = "auto"                          # auto, float32, bfloat16, float16
# -----------------------------------------------------------------------------


def parse_request(query, n_models):
    """The settings of a /generate request from its query string.
    Returns dict with model (index), prompt (str), temperature, top_k, top_p, max_new_tokens.
    Raises UserError naming the bad parameter: not UTF-8, not a number, out of range."""
    try:
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True, errors="strict").items()}
    except UnicodeDecodeError:
        raise UserError("the query string is not UTF-8: percent-encode the UTF-8 bytes of the text") from None
    req = {"prompt": params.get("prompt", "")}
    for name, kind, default in (("model", int, 0), ("temperature", float, 0.8), ("top_k", int, 0),
                                ("top_p", float, 0.95), ("max_new_tokens", int, min(256, max_new_tokens))):
        try:
            req[name] = kind(params.get(name, default))
        except ValueError:
            raise UserError(f"{name}={params[name]!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(req[name]):
            raise UserError(f"{name} must be a finite number, got {params[name]!r}")
    if not 0 <= req["model"] < n_models:
        raise UserError(f"model={req['model']}: this server has models 0 to {n_models - 1}")
    if req["max_new_tokens"] > max_new_tokens:
        raise UserError(f"max_new_tokens={req['max_new_tokens']} is more than this server allows "
                        f"({max_new_tokens}; serve.py --max_new_tokens sets it)")
    check_sampling(req["temperature"], req["top_k"], req["top_p"], req["max_new_tokens"])
    return req


class Handler(BaseHTTPRequestHandler):
    """GET / (the page) and GET /generate (a story as server-sent events); self.server.models holds the models."""

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/":
            return self.reply(200, "text/html; charset=utf-8", self.server.page)
        if url.path != "/generate":
            return self.reply(404, "application/json", json.dumps({"error": f"no page {url.path}"}))
        try:
            if not self.path.isascii():  # raw bytes in the request line; browsers percent-encode them
                raise UserError("the URL has bytes that are not ASCII: percent-encode the text as UTF-8")
            req = parse_request(url.query, len(self.server.models))
        except UserError as e:
            return self.reply(400, "application/json", json.dumps({"error": str(e)}))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            self.write_story(self.server.models[req["model"]], req)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader pressed stop or closed the page; the model is free again for the next story

    def write_story(self, m, req):
        """Generate one story with model entry `m` and send each new piece of text as an event."""
        tok = m["tok"]
        ids = tok.encode_prompt(req["prompt"])
        idx = torch.tensor([ids], dtype=torch.long, device=m["device"])
        dec, n = StreamDecoder(tok), 0
        with m["lock"]:  # one story at a time per model
            t0 = time.perf_counter()
            for step in m["model"].generate_stream(idx, req["max_new_tokens"], req["temperature"], req["top_k"],
                                                   req["top_p"], tok.eot_token, tok.vocab_size):
                t = int(step[0])
                if t == tok.eot_token:
                    break
                n += 1
                piece = dec.push([t])
                if piece:
                    self.send_event({"text": piece})
            seconds = time.perf_counter() - t0
        self.send_event({"text": dec.flush(), "done": True, "tokens": n, "seconds": round(seconds, 3)})

    def send_event(self, data):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())

    def reply(self, status, content_type, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    configure(globals(), doc=__doc__)
    check_sampling(max_new_tokens=max_new_tokens)
    if not 0 <= port <= 65535:
        raise UserError(f"port must be 0 (any free one) to 65535, got {port}")
    dev, _, precision = resolve_device(device, dtype)
    models = []
    for d in out_dir.split(","):
        model, tok, info = load_model(f"{d}/{checkpoint}", device=dev)
        models.append({"name": d, "model": model.to(DTYPES[precision]), "tok": tok, "device": dev,
                       "lock": threading.Lock(), "about": f"{model.num_params() / 1e6:.1f}M parameters, "
                       f"{tok.spec['name']} tokenizer, {info.get('iter_num', '?')} iterations"})
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): is another server running there? "
                        f"Pick another --port") from None
    server.daemon_threads = True  # Ctrl-C ends the server even while a story is being written
    server.models = models
    about = [{"name": m["name"], "about": m["about"]} for m in models]
    server.page = (Path(__file__).parent / "serve.html").read_text(encoding="utf-8").replace(
        "MODELS = []", f"MODELS = {json.dumps(about)}")
    print(f"{len(models)} model(s) on {dev} in {precision}: open http://{host}:{server.server_address[1]}",
          file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    run(main)
