"""A story page in the browser: type an opening, set the sampling, watch the model write the rest.

    python serve.py --out_dir=out                   # then open http://localhost:8000
    python serve.py --out_dir=out-1m,out-15m        # several models side by side, same prompt

Serves one page (serve.html: plain HTML and JavaScript, no external files, so it works offline) and
GET /generate?model=0&prompt=...&temperature=...&top_k=...&top_p=...&max_new_tokens=... (each optional; defaults:
model.SAMPLING_DEFAULTS, with max_new_tokens at most --max_new_tokens; and, for a story on request,
words=dog,ball,happy&features=Dialogue&summary=...: the prompt then follows instruct.header's lines, as sample.py
--words builds it), which answers with
server-sent events (text/event-stream, https://html.spec.whatwg.org/multipage/server-sent-events.html): one
`data: {"text": ...}` event per piece of the story as it is written, then `data: {"done": true, "tokens": n,
"seconds": s}`. A bad request gets HTTP 400 with {"error": "..."}. Each model writes one story at a time (a
lock per model); other requests for it wait their turn. Only the standard library's http.server.

It listens on 127.0.0.1, reachable from this machine only, unless --host says otherwise (--host=0.0.0.0 or
--host=::, every network this machine is on, with no password: it prints a warning). On a shared machine:
- it answers only requests addressed to one of its own names (the Host header: 127.0.0.1, localhost, [::1], the
  --host name, any IP address, and the machine's own names when it listens on every network; any port), so a web
  page cannot reach it through a domain that resolves to this machine (DNS rebinding) and read its answers;
- /generate answers only its own page: a request that a browser marks as coming from another page (an Origin
  header that is not this server, or Sec-Fetch-Site other than same-origin or none) gets 403 with the reason;
- at most --max_connections connections are served at once (more get 503 at once), and a client that sends or
  reads nothing for --timeout seconds is disconnected, so idle connections cannot hold the server's threads.
"""

import errno
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch

from checkpoint import load_model
from configurator import DTYPES, UserError, check_values, configure, resolve_device, run
from fast import speed_up
from instruct import header_tokens, instructed_prompt
from model import SAMPLING_DEFAULTS, check_sampling
from tokenizer import StreamDecoder

# -----------------------------------------------------------------------------
out_dir = "out"                         # directory that holds the checkpoint; several separated by commas
checkpoint = "best_model_params.pt"     # file name inside each out_dir
host = "127.0.0.1"                      # 0.0.0.0 (or ::) to accept connections from other machines
port = 8000                             # 0: any free port (printed at start)
max_new_tokens = 1000                   # the longest story a request may ask for, in tokens
max_connections = 32                    # connections served at once; more are answered 503 at once
timeout = 30.0                          # seconds a client may send or read nothing before it is disconnected
device = "auto"                         # auto, cpu, mps, cuda, cuda:N
dtype = "auto"                          # auto, float32, bfloat16, float16
# -----------------------------------------------------------------------------


def sampling_defaults():
    """The sampling settings a /generate request gets for those it leaves out, and the page's fields start with:
    model.SAMPLING_DEFAULTS, with max_new_tokens (tokens) at most this server's --max_new_tokens.
    Returns a new dict: temperature, top_k, top_p, max_new_tokens."""
    return {**SAMPLING_DEFAULTS, "max_new_tokens": min(SAMPLING_DEFAULTS["max_new_tokens"], max_new_tokens)}


def parse_request(query, n_models):
    """The settings of a /generate request from its query string.

    Args:
        query: the URL's query string (percent-encoded UTF-8); n_models: how many models this server has.
    Returns:
        dict with model (index), prompt (str: behind instruct.instructed_prompt's header when the request has
        words, features or a summary), temperature, top_k, top_p, max_new_tokens (tokens); a setting the request
        leaves out takes its value from sampling_defaults() (model: 0).
    Raises:
        UserError naming the bad parameter: not UTF-8, not a number, out of range, a bad instruction field.
    """
    try:
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True, errors="strict").items()}
    except UnicodeDecodeError:
        raise UserError("the query string is not UTF-8: percent-encode the UTF-8 bytes of the text") from None
    req = {"prompt": instructed_prompt(params.get("prompt", ""), params.get("words", ""), params.get("features", ""),
                                       params.get("summary", ""))}
    defaults = {"model": 0, **sampling_defaults()}
    for name, kind in (("model", int), ("temperature", float), ("top_k", int), ("top_p", float),
                       ("max_new_tokens", int)):
        try:
            req[name] = kind(params.get(name, defaults[name]))
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


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def host_and_port(authority, default_port=80):
    """(name, port) of a Host header or an Origin's "host[:port]": the name lower-case, without the brackets of an
    IPv6 address or a final dot; port an int (`default_port` when absent, None when not a number)."""
    url = urlsplit("//" + authority.strip())
    try:
        port_ = url.port
    except ValueError:
        port_ = None
    else:
        port_ = default_port if port_ is None else port_
    return (url.hostname or "").rstrip("."), port_


def own_names(host):
    """The names this server answers to when it listens on `host` (see the module's docstring): a frozenset of
    lower-case names. IP addresses are allowed separately (is_own_name): DNS rebinding needs a domain name."""
    names = set(LOOPBACK_NAMES) | {host.lower().strip("[]").rstrip(".")}
    if host in WILDCARDS:  # every network: also the names other machines know this one by
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names - {""})


def is_own_name(name, names):
    """Whether the Host name `name` (from host_and_port) is one of `names` or an IP address. An address typed in
    a browser makes the page's origin that address, so no other site's page can read the answers through it."""
    if name in names:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def foreign_host(headers, names):
    """Why a request must not be answered because of the name it was sent to, or None. Its Host header must be
    one of this server's names (`names`: own_names) or an IP address, with any port; a request without a Host
    header (HTTP/1.0 from a script) is allowed: browsers always send one. `headers`: the request's headers
    (a mapping with .get). Returns str (the reason, for a 403 answer) or None."""
    value = headers.get("Host")
    if value is None or is_own_name(host_and_port(value)[0], names):
        return None
    return (f"this server does not answer to the name {value!r}: open it by its own address, e.g. http://127.0.0.1 "
            f"or http://localhost with the port it printed (other names are refused so that no web page can reach "
            f"it through a domain of its own: DNS rebinding)")


def foreign_page(headers):
    """Why a /generate request must not be answered because a browser sent it from another page, or None: an
    Origin header other than http://<Host> (same name and port), or a Sec-Fetch-Site header other than
    same-origin or none (none: typed in the address bar). Browsers send Origin with every cross-origin fetch and
    Sec-Fetch-Site with every request (Fetch Metadata, https://www.w3.org/TR/fetch-metadata/), so an <img> or a
    form on another site cannot make this server write stories either. Returns str (the reason) or None."""
    origin, host_header = headers.get("Origin"), headers.get("Host")
    if origin is not None:
        scheme, _, authority = origin.partition("://")
        if host_header is None or scheme.lower() != "http" or host_and_port(authority) != host_and_port(host_header):
            return (f"a request from the page {origin!r}: /generate answers only this server's own page (open the "
                    f"page from this server to write stories)")
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return (f"a request from another page (Sec-Fetch-Site: {site}): /generate answers only this server's own "
                f"page (open the page from this server to write stories)")
    return None


class Handler(BaseHTTPRequestHandler):
    """GET / (the page) and GET /generate (a story as server-sent events); self.server.models holds the models.
    `timeout` (seconds; socketserver applies it to the connection) is set by main from --timeout."""

    timeout = 30.0

    def do_GET(self):
        url = urlsplit(self.path)
        reason = foreign_host(self.headers, self.server.names) or (
            foreign_page(self.headers) if url.path == "/generate" else None)
        if reason:
            return self.reply(403, "application/json", json.dumps({"error": reason}))
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
        self.write_story(self.server.models[req["model"]], req)

    def write_story(self, m, req):
        """Generate one story with model entry `m` and send each new piece of text as an event."""
        tok = m["tok"]
        ids = tok.encode_prompt(req["prompt"])
        idx = torch.tensor([ids], dtype=torch.long, device=m["device"])
        dec, n = StreamDecoder(tok), 0
        with m["lock"]:  # one story at a time per model
            t0 = time.perf_counter()
            keep = header_tokens(tok, req["prompt"])  # an instruction header stays in view, as in training
            for step in m["model"].generate_stream(idx, req["max_new_tokens"], req["temperature"], req["top_k"],
                                                   req["top_p"], tok.eot_token, tok.vocab_size, keep=keep):
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


BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        b'{"error": "the server has as many connections open as it serves at once (--max_connections): '
        b'try again shortly"}')


class StoryServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a thread per connection, at most `max_connections` of them: a connection beyond
    that is answered 503 and closed by the accepting thread, so idle clients cannot pile up threads. Listens
    on IPv4 or IPv6 as `family` says. A client that goes away mid-answer (reset, broken pipe, timeout) is no
    error here: it is not logged with a traceback.

    Args:
        address: (host, port) to bind; family: socket.AF_INET or AF_INET6; handler: the request handler class.
    """

    daemon_threads = True  # Ctrl-C ends the server even while a story is being written

    def __init__(self, address, handler, family=socket.AF_INET, max_connections=32):
        self.address_family = family
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.setblocking(False)  # a client that reads nothing must not block the accepting thread
                request.send(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the reader pressed stop, closed the page or went silent; the model is free for the next story
        super().handle_error(request, client_address)


def make_server(host, port, models, page, max_connections=32, timeout=30.0):
    """A StoryServer for `models` (entries as main builds them) and the page text, listening on host:port.
    Returns StoryServer; its server_address[1] is the port (useful with port 0).
    Raises UserError: the host name does not resolve, or the address cannot be listened on (in use, not this
        machine's, a port below 1024 without the right)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host={host!r} is not an address or a name this machine can resolve "
                        f"({getattr(e, 'strerror', None) or e}): use 127.0.0.1, ::1, 0.0.0.0 or ::") from None
    handler = type("StoryHandler", (Handler,), {"timeout": timeout})
    try:
        server = StoryServer(address[:2], handler, family, max_connections)
    except OSError as e:
        why = {errno.EADDRINUSE: "is another server running there? Pick another --port",
               errno.EADDRNOTAVAIL: "it is not an address of this machine: use 127.0.0.1, ::1, 0.0.0.0 or ::",
               errno.EACCES: "ports below 1024 need administrator rights: pick a port from 1024 to 65535"}
        raise UserError(f"cannot listen on {url_host(host)}:{port} ({e.strerror}): "
                        f"{why.get(e.errno, 'check --host and --port')}") from None
    server.models, server.page, server.names = models, page, own_names(host)
    server.loopback = is_loopback(address[0])
    return server


def page_html(about):
    """The story page as served: serve.html with its MODELS set to `about` (a list of {"name": str, "about": str},
    one per model, in /generate's model order) and its DEFAULTS, the fields' starting values, to
    sampling_defaults(). Returns str (HTML). Raises RuntimeError if serve.html lacks either placeholder."""
    page = (Path(__file__).parent / "serve.html").read_text(encoding="utf-8")
    for name, empty, value in (("MODELS", "[]", about), ("DEFAULTS", "{}", sampling_defaults())):
        placeholder = f"const {name} = {empty};"
        if page.count(placeholder) != 1:
            raise RuntimeError(f"serve.html must hold {placeholder!r} once, for serve.py to fill in")
        text = json.dumps(value).replace("<", "\\u003c")  # so that a name holding "</script>" cannot end the script
        page = page.replace(placeholder, f"const {name} = {text};")
    return page


def is_loopback(address):
    """Whether the numeric address a server binds ("127.0.0.1", "::1", "0.0.0.0", "fe80::1%eth0") is reachable
    from this machine only."""
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def url_host(host):
    """`host` as it appears in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def main():
    configure(globals(), doc=__doc__)
    check_sampling(max_new_tokens=max_new_tokens)
    check_values(globals(), {"max_connections": "count", "timeout": "rate"})
    if not 0 <= port <= 65535:
        raise UserError(f"port must be 0 (any free one) to 65535, got {port}")
    dirs = out_dir.split(",")
    if "" in dirs:
        raise UserError(f"out_dir={out_dir!r} has an empty entry: name each folder once, separated by single "
                        f"commas with none at the start or end")
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(f"out_dir {d!r} {'is a file, not' if os.path.exists(d) else 'is not'} a folder: "
                            f"name the folder that holds {checkpoint}")
    dev, _, precision = resolve_device(device, dtype)
    models = []
    for d in dirs:
        model, tok, info = load_model(os.path.join(d, checkpoint), device=dev)
        model = speed_up(model.to(DTYPES[precision]))  # fast.py: on a CPU, attention in float32, faster there
        models.append({"name": d, "model": model, "tok": tok, "device": dev,
                       "lock": threading.Lock(), "about": f"{model.num_params() / 1e6:.1f}M parameters, "
                       f"{tok.spec['name']} tokenizer, {info.get('iter_num', '?')} iterations"
                       + ("" if info.get("instruct") else "; not trained with instructions (words, features)")})
    page = page_html([{"name": m["name"], "about": m["about"]} for m in models])
    server = make_server(host, port, models, page, max_connections, timeout)
    if not server.loopback:
        print(f"warning: listening on {url_host(host)}, open to every machine that can reach this one, with no "
              f"password: anyone there can use the models (--host=127.0.0.1 keeps it to this machine)",
              file=sys.stderr, flush=True)
    shown = "127.0.0.1" if host in WILDCARDS else host
    print(f"{len(models)} model(s) on {dev} in {precision}: open http://{url_host(shown)}:{server.server_address[1]}",
          file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    run(main)
