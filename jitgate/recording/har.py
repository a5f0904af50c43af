"""HAR 1.2 of a session, valid JSON after every write.

The file is `<head>` + entries, one per line, separated by `,\\n` + `<suffix>` (`\\n]}}\\n`). A new
entry is written with its separator and the suffix in one `pwrite` at the offset where the old
suffix began: the file is complete before and after, so a gateway killed with SIGKILL leaves a HAR
that parses and holds every call completed before. (Linux may cut a very large write short when
the process is killed in the middle of it; a file that does not end with the suffix is repaired
when it is opened again: the entries on complete lines are kept.)

Entries follow mitmproxy's `savehar` (and Chrome's DevTools) for what HAR 1.2 does not say:
WebSocket messages as `_webSocketMessages`, `_resourceType: websocket`, `_error` for calls without
a response. Each entry also carries the call's jitgate record (`_jitgate`: decision, grant, rule,
auditID) and a one-line `comment`. Past the size cap, one last entry marks the truncation
(`_jitgateTruncated`, with a comment that says where the rest is) and nothing more is added.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import zlib
from pathlib import Path
from urllib.parse import parse_qsl

HEAD_KEY = b'"entries":['
SUFFIX = b"\n]}}\n"
TRUNCATED_KEY = "_jitgateTruncated"
MARKER_RESERVE = 4096  # room kept for the truncation marker entry
MIN_MAX_BYTES = 64 * 1024


_last_second: tuple[int, str] = (-1, "")  # the last whole second formatted: calls of one second share it


def _iso(timestamp: float | None) -> str:
    """RFC 3339 in UTC with milliseconds, as HAR's startedDateTime."""
    global _last_second
    timestamp = timestamp or 0
    second = int(timestamp // 1)
    micros = round((timestamp - second) * 1e6)  # as datetime rounds a timestamp: to microseconds, half even
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    cached = _last_second  # read once: the pair is replaced whole, never changed in place
    if cached[0] != second:
        moment = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
        cached = _last_second = (second, moment.strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micros // 1000:03d}Z"


def _str(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _header_list(fields) -> list[dict]:
    return [{"name": _text(k), "value": _text(v)} for k, v in fields or ()]


def _header(fields, name: bytes) -> str:
    for k, v in fields or ():
        if k.lower() == name:
            return _text(v)
    return ""


def _ms(start: float | None, end: float | None) -> float:
    if not start or not end or end < start:
        return 0.0
    return round((end - start) * 1000, 3)


def drop_headers(fields, names: tuple[bytes, ...]) -> tuple:
    """Header fields without those named (lower-case bytes)."""
    return tuple((k, v) for k, v in fields if k.lower() not in names)


def undo_content_encoding(message: dict, what: str) -> str:
    """A recorded request or response state (`get_state()`'s) with its Content-Encoding undone in
    place, the headers that described the encoded body dropped; the note to keep when the body could
    not be decoded and was left out (recordings keep bodies as the client would read them), else ""."""
    body = message.get("content") or b""
    encoding = _header(message.get("headers"), b"content-encoding")
    if not body or encoding.strip().lower() in ("", "identity"):
        return ""
    decoded = decode_body(body, encoding)
    message["headers"] = drop_headers(message["headers"], (b"content-encoding", b"content-length"))
    if decoded is None:
        message["content"] = b""
        return f"{what} body not recorded: content encoding {encoding!r} could not be undone"
    message["content"] = decoded
    return ""


def decode_body(content: bytes, encoding: str) -> bytes | None:
    """A body with its Content-Encoding undone, or None when it cannot be (unknown coding, corrupt)."""
    coding = encoding.strip().lower()
    if not content or coding in ("", "identity"):
        return content
    try:
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(content, 16 + zlib.MAX_WBITS)
        if coding == "deflate":
            try:
                return zlib.decompress(content)
            except zlib.error:
                return zlib.decompress(content, -zlib.MAX_WBITS)
        if coding == "br":
            import brotli  # mitmproxy depends on it

            return brotli.decompress(content)
        if coding == "zstd":
            import zstandard  # mitmproxy depends on it

            return zstandard.ZstdDecompressor().decompressobj().decompress(content)
    except Exception:  # noqa: BLE001 - a corrupt body is not recorded, whatever broke
        return None
    return None


def _is_text(content: bytes) -> bool:
    if content.isascii():  # most bodies: no decode (and no copy) needed to know
        return b"\x00" not in content
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in content


def _url(request: dict) -> str:
    scheme = _str(request.get("scheme")) or "https"
    method = _str(request.get("method"))
    host = _str(request.get("authority")) or _header(request.get("headers"), b"host")
    if not host:
        port = request.get("port")
        host = _str(request.get("host"))
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        if port and not ((scheme == "https" and port == 443) or (scheme == "http" and port == 80)):
            host = f"{host}:{port}"
    if method == "CONNECT":
        return f"https://{host}/"
    return f"{scheme}://{host}{_str(request.get('path'))}"


def _query(path: bytes) -> list[dict]:
    _, sep, query = path.partition(b"?")
    if not sep:
        return []
    return [{"name": k, "value": v} for k, v in parse_qsl(_text(query), keep_blank_values=True)]


class Text:
    """A body's UTF-8 text, written into the HAR by `dumps` (escaped fast: JSON's own encoder takes
    about 6 ns a byte, a 52 KB list ~300 µs, where a few `bytes.replace` take a tenth of it)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


_OTHER_CONTROL = bytes(c for c in range(0x20) if c not in b"\n\r\t")  # escaped \u00XX or \b, \f


def py_json_text(data: bytes) -> bytes:
    """UTF-8 text as the inside of a JSON string, as `json.dumps(text, ensure_ascii=False)` writes it
    (a few `bytes.replace` where only quotes, backslashes and line ends need escapes); `json_text`
    is this in C where jitgate.recording._encode is built (a quarter of the time on a pod list)."""
    if len(data.translate(None, _OTHER_CONTROL)) != len(data):
        return json.dumps(data.decode("utf-8"), ensure_ascii=False)[1:-1].encode()  # other control characters
    out = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    if b"\n" in out or b"\r" in out or b"\t" in out:
        out = out.replace(b"\n", b"\\n").replace(b"\r", b"\\r").replace(b"\t", b"\\t")
    return out


try:
    from jitgate.recording._encode import json_text
except ImportError:  # not built (no compiler where it was installed)
    json_text = py_json_text


def _content(body: bytes, mime: str, note: str = "") -> dict:
    content: dict = {"size": len(body), "mimeType": mime or "x-unknown"}
    if body:
        if _is_text(body):
            content["text"] = Text(body)
        else:
            content["text"] = base64.b64encode(body).decode()
            content["encoding"] = "base64"
    if note:
        content["comment"] = note
    return content


def _websocket_messages(messages) -> list[dict]:
    out = []
    for kind, from_client, content, timestamp, *_ in messages:
        text = kind == 1 and _is_text(content)
        out.append({
            "type": "send" if from_client else "receive",
            "time": timestamp,
            "opcode": 1 if kind == 1 else 2,
            "data": content.decode("utf-8") if text else base64.b64encode(content).decode(),
        })
    return out


def summary(record: dict) -> str:
    """One line an operator reads next to a flow: decision, grant and rule, auditID."""
    parts = [f"jitgate: {record.get('decision', 'none')}"]
    if record.get("grant"):
        parts.append(f"grant {record['grant']} (rule {record.get('rule', '?')})")
    if record.get("user"):
        parts.append(f"user {record['user'].get('username', '')}")
    if record.get("decision") == "deny" and record.get("reason"):
        parts.append(f"reason: {record['reason'][:300]}")
    parts.append(f"auditID {record.get('auditID', '')}")
    return "; ".join(parts)


def entry(state: dict, record: dict, notes: dict[str, str] | None = None, comment: str | None = None) -> dict:
    """The HAR entry of one flow state (`Flow.get_state()`, scrubbed and masked), with its record.
    `notes`: comments on the request or response body (`request`, `response`: why it is cut or left out);
    `comment`: the record's `summary` when the caller made it already."""
    notes = notes or {}
    request = state["request"]
    response = state.get("response")
    req_headers = request.get("headers") or ()
    req_body = request.get("content") or b""
    path = request.get("path") or b""
    send = _ms(request.get("timestamp_start"), request.get("timestamp_end"))
    if response:
        wait = _ms(request.get("timestamp_end") or request.get("timestamp_start"), response.get("timestamp_start"))
        receive = _ms(response.get("timestamp_start"), response.get("timestamp_end"))
        body = response.get("content") or b""
        har_response = {
            "status": response.get("status_code", 0),
            "statusText": _str(response.get("reason")),
            "httpVersion": _str(response.get("http_version")),
            "cookies": [],
            "headers": _header_list(response.get("headers")),
            "content": _content(body, _header(response.get("headers"), b"content-type"), notes.get("response", "")),
            "redirectURL": _header(response.get("headers"), b"location"),
            "headersSize": -1,
            "bodySize": len(body),
        }
    else:
        wait = receive = 0.0
        har_response = {
            "status": 0, "statusText": "", "httpVersion": "", "cookies": [], "headers": [],
            "content": {"size": 0, "mimeType": "x-unknown"}, "redirectURL": "", "headersSize": -1, "bodySize": -1,
            "_error": (state.get("error") or {}).get("msg"),
        }
    har_request: dict = {
        "method": _str(request.get("method")),
        "url": _url(request),
        "httpVersion": _str(request.get("http_version")),
        "cookies": [],
        "headers": _header_list(req_headers),
        "queryString": _query(path),
        "headersSize": -1,
        "bodySize": len(req_body),
    }
    if req_body or notes.get("request"):
        mime = _header(req_headers, b"content-type") or "x-unknown"
        post: dict = {"mimeType": mime, "text": Text(req_body) if _is_text(req_body) else ""}
        comment = notes.get("request", "")
        if req_body and not _is_text(req_body):
            comment = comment or f"binary body ({len(req_body)} bytes): see flows.mitm"
        if comment:
            post["comment"] = comment
        har_request["postData"] = post
    timings = {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": send, "wait": wait, "receive": receive}
    out: dict = {
        "startedDateTime": _iso(request.get("timestamp_start")),
        "time": round(send + wait + receive, 3),
        "request": har_request,
        "response": har_response,
        "cache": {},
        "timings": timings,
        "comment": summary(record) if comment is None else comment,
        "_jitgate": record,
    }
    peer = (state.get("server_conn") or {}).get("peername")
    if peer:
        out["serverIPAddress"] = str(peer[0])
    websocket = state.get("websocket")
    if websocket is not None:
        out["_resourceType"] = "websocket"
        out["_webSocketMessages"] = _websocket_messages(websocket.get("messages") or ())
    return out


def truncation_entry(started: float, cap: int) -> dict:
    """The last entry of a HAR that reached its cap: later calls are in flows.mitm and the index only."""
    comment = (f"jitgate: this HAR reached its cap of {cap} bytes (recording_har_max_bytes); later calls of the "
               "session are in flows.mitm and the recordings index only")
    return {
        "startedDateTime": _iso(started),
        "time": 0,
        "request": {"method": "GET", "url": "http://jitgate.invalid/recording-truncated", "httpVersion": "HTTP/1.1",
                    "cookies": [], "headers": [], "queryString": [], "headersSize": -1, "bodySize": 0},
        "response": {"status": 0, "statusText": "", "httpVersion": "", "cookies": [], "headers": [],
                     "content": {"size": 0, "mimeType": "x-unknown"}, "redirectURL": "", "headersSize": -1,
                     "bodySize": -1},
        "cache": {},
        "timings": {"send": 0, "wait": 0, "receive": 0},
        "comment": comment,
        TRUNCATED_KEY: True,
    }


def dumps(obj: dict) -> bytes:
    """One entry on one line (JSON escapes every newline inside strings); bodies (`Text`) as UTF-8."""
    return b"".join(entry_pieces(obj))


def entry_pieces(obj: dict) -> list[bytes]:
    """`dumps` as pieces to write one after the other: each body a piece of its own, not copied again."""
    texts: list[Text] = []
    nonce = os.urandom(6).hex()  # no other string of the entry can spell a placeholder

    def placeholder(value):
        if isinstance(value, Text):
            texts.append(value)
            return f"\0{nonce}-{len(texts) - 1}\0"
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    out = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=placeholder).encode()
    if not texts:
        return [out]
    pieces, rest = [], out
    for i, text in enumerate(texts):
        before, _, rest = rest.partition(b'"\\u0000%s-%d\\u0000"' % (nonce.encode(), i))
        pieces += (before + b'"', json_text(text.data), b'"')
    pieces.append(rest)
    return pieces


def head(session_id: str, creator_version: str) -> bytes:
    log = {"version": "1.2", "creator": {"name": "jitgate", "version": creator_version},
           "pages": [], "comment": f"jitgate session {session_id}: masked, without credentials"}
    text = json.dumps({"log": log}, separators=(",", ":"))
    return text[:-2].encode() + b"," + HEAD_KEY  # "entries" last, left open


def repaired(data: bytes) -> bytes:
    """A HAR file cut short (a write the kernel cut when the process was killed): the head and every
    entry on a complete line that parses, properly ended. A complete file comes back as it is."""
    if data.endswith(SUFFIX):
        return data
    lines = data.split(b"\n")
    kept = []
    for line in lines[1:]:
        item = line[:-1] if line.endswith(b",") else line
        try:
            if not isinstance(json.loads(item), dict):
                break
        except ValueError:
            break
        kept.append(item)
    return lines[0] + (b"\n" + b",\n".join(kept) if kept else b"") + SUFFIX


class HarFile:
    """One session's HAR, opened for appending entries; at most `max_bytes` long."""

    def __init__(self, path: Path, session_id: str, max_bytes: int, creator_version: str = "0") -> None:
        self.path = path
        self.max_bytes = max(max_bytes, MIN_MAX_BYTES)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(self.fd).st_size
        if size == 0:
            data = head(session_id, creator_version) + SUFFIX
            os.pwrite(self.fd, data, 0)
            size = len(data)
        elif not self._ends_well(size):
            size = self._repair()
        self.end = size - len(SUFFIX)  # where the suffix begins: the next entry goes there
        tail = os.pread(self.fd, min(self.end, MARKER_RESERVE), max(self.end - MARKER_RESERVE, 0))
        self.empty = tail.endswith(HEAD_KEY)
        self.truncated = TRUNCATED_KEY.encode() in tail

    def _ends_well(self, size: int) -> bool:
        return size > len(SUFFIX) and os.pread(self.fd, len(SUFFIX), size - len(SUFFIX)) == SUFFIX

    def _repair(self) -> int:
        with open(self.fd, "rb", closefd=False) as f:
            f.seek(0)
            data = repaired(f.read())
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        return len(data)

    @property
    def size(self) -> int:
        return self.end + len(SUFFIX)

    def add(self, entry: list[bytes], started: float) -> bool:
        """Append one entry (`entry_pieces`); False when the cap stops it (the marker is written once)."""
        if self.truncated:
            return False
        separator = b"\n" if self.empty else b",\n"
        if self.end + len(separator) + sum(map(len, entry)) + len(SUFFIX) + MARKER_RESERVE > self.max_bytes:
            self._write([separator, dumps(truncation_entry(started, self.max_bytes))])
            self.truncated = True
            return False
        self._write([separator, *entry])
        return True

    def _write(self, pieces: list[bytes]) -> None:
        """Pieces and suffix in one write where the old suffix began (gathered: nothing is copied)."""
        size = sum(map(len, pieces))
        pieces.append(SUFFIX)
        written = os.pwritev(self.fd, pieces, self.end)
        if written < size + len(SUFFIX):  # cut short (a signal, a full disk): the rest as one buffer
            data = b"".join(pieces)
            while written < len(data):
                written += os.pwrite(self.fd, data[written:], self.end + written)
        self.end += size
        self.empty = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
