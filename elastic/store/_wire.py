"""The embedded rendezvous protocol: framing, encoding, authentication, TLS and token settings.

A message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (never
pickle). A stored value travels as a JSON string when it is UTF-8 text (every value the round
protocol writes is) and as ``{"b64": ...}`` otherwise, so the closed round that a thousand
joiners receive is not base64-encoded and decoded a thousand times. A connection starts with
a handshake:

1. server -> ``{"hello": "elastic-rendezvous", "version": 1, "instance": ID, "nonce": B64,
   "auth": bool}``
2. client -> ``{"proof": HEX, "nonce": B64}``; ``proof`` is
   HMAC-SHA256(token, "elastic-rdzv-client" + server nonce + client nonce), or null when the
   server asks for no token.
3. server -> ``{"ok": true, "proof": HEX}`` (HMAC-SHA256(token, "elastic-rdzv-server" +
   client nonce + server nonce), so the client knows the server holds the token as well) or
   ``{"ok": false, "error": "..."}`` and the connection is closed.

Then requests ``{"id": N, "op": NAME, ...}`` and replies ``{"id": N, "ok": true, "result": ...}``
or ``{"id": N, "ok": false, "error": KIND, "message": TEXT}``; replies may come out of order
(a ``wait`` is answered when it completes).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import ssl
import struct
from typing import Any, Dict, Optional, overload

from ..errors import ConfigError
from .api import Event, KeyValue, StoreArgumentError, StoreError

__all__ = []

PROTOCOL = "elastic-rendezvous"
VERSION = 2
HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 16 << 20  # authenticated peers
MAX_HANDSHAKE_BYTES = 4096  # before authentication: tiny, so strangers cannot make us allocate
TOKEN_ENV = "ELASTIC_RDZV_TOKEN"
TOKEN_FILE_ENV = "ELASTIC_RDZV_TOKEN_FILE"


class ProtocolError(StoreError):
    """The peer broke the protocol (bad framing, bad JSON, bad fields); drop the connection."""


# -- framing ---------------------------------------------------------------------------------
def encode(message: Dict[str, Any]) -> bytes:
    return _frame(json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def encode_result(request_id: int, result_json: bytes) -> bytes:
    """A success reply around an already-encoded result (one encoding for many waiters)."""
    return _frame(b'{"id":%d,"ok":true,"result":%s}' % (request_id, result_json))


def _frame(body: bytes) -> bytes:
    if len(body) > MAX_MESSAGE_BYTES:
        raise StoreArgumentError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"invalid JSON message: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def check_length(length: int, limit: int) -> None:
    if length > limit:
        raise ProtocolError(f"message length {length} exceeds the {limit}-byte limit")


# -- values ----------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("binary value must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ProtocolError("invalid base64 value") from None


def value_to_wire(value: bytes) -> Any:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": b64(value)}


def value_from_wire(data: Any) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from "\ud800" in the JSON
            raise ProtocolError("value is not valid UTF-8 text") from None
    if isinstance(data, dict) and len(data) == 1 and "b64" in data:
        return unb64(data["b64"])
    raise ProtocolError('a value must be a string or {"b64": string}')


def kv_to_wire(kv: Optional[KeyValue]) -> Optional[Dict[str, Any]]:
    if kv is None:
        return None
    return {"k": kv.key, "v": value_to_wire(kv.value), "r": kv.mod_revision, "l": kv.lease}


@overload
def kv_from_wire(data: Dict[str, Any]) -> KeyValue: ...
@overload
def kv_from_wire(data: None) -> None: ...
@overload
def kv_from_wire(data: Optional[Dict[str, Any]]) -> Optional[KeyValue]: ...
def kv_from_wire(data: Optional[Dict[str, Any]]) -> Optional[KeyValue]:
    """The key-value a peer sent (None for None: a missing key)."""
    if data is None:
        return None
    return KeyValue(data["k"], value_from_wire(data["v"]), int(data["r"]), int(data["l"]))


def event_to_wire(event: Event) -> Dict[str, Any]:
    return {"t": event.kind, "k": event.key, "v": value_to_wire(event.value), "r": event.revision}


def event_from_wire(data: Dict[str, Any]) -> Event:
    return Event(data["t"], data["k"], value_from_wire(data["v"]), int(data["r"]))


# -- authentication --------------------------------------------------------------------------
def new_nonce() -> bytes:
    return os.urandom(32)


def client_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> str:
    return hmac.new(token, b"elastic-rdzv-client" + server_nonce + client_nonce,
                    hashlib.sha256).hexdigest()


def server_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> str:
    return hmac.new(token, b"elastic-rdzv-server" + client_nonce + server_nonce,
                    hashlib.sha256).hexdigest()


def proof_matches(expected: str, given: Any) -> bool:
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.encode("utf-8", "replace"))


def resolve_token(token: Optional[str] = None, token_file: Optional[str] = None,
                  environ: Optional[Dict[str, str]] = None) -> Optional[bytes]:
    """The shared token: ``token``, else ``token_file``, else $ELASTIC_RDZV_TOKEN, else
    the file named by $ELASTIC_RDZV_TOKEN_FILE; None when none is configured."""
    env = os.environ if environ is None else environ
    if token:
        return token.encode("utf-8")
    if token_file:
        return _read_token_file(token_file)
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].encode("utf-8")
    if env.get(TOKEN_FILE_ENV):
        return _read_token_file(env[TOKEN_FILE_ENV])
    return None


def _read_token_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the rendezvous token file {path}: "
                          f"{exc.strerror or exc}") from None
    if not data:
        raise ConfigError(f"the rendezvous token file {path} is empty")
    return data


# -- TLS -------------------------------------------------------------------------------------
def _check_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"the {what} file {path} does not exist")
    return path


def server_ssl_context(cert: Optional[str], key: Optional[str],
                       ca: Optional[str] = None) -> Optional[ssl.SSLContext]:
    """TLS for the server from a certificate and key; with ``ca``, clients need a
    certificate signed by it too. None when no certificate is given."""
    if not cert and not key:
        if ca:
            raise ConfigError("tls_ca for the rendezvous server needs tls_cert and tls_key too")
        return None
    if not (cert and key):
        raise ConfigError("TLS for the rendezvous server needs both tls_cert and tls_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(_check_file(cert, "TLS certificate"), _check_file(key, "TLS key"))
        if ca:
            ctx.load_verify_locations(_check_file(ca, "TLS CA"))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the TLS certificate/key: {exc.reason or exc}") from None
    return ctx


def client_ssl_context(ca: Optional[str] = None, cert: Optional[str] = None,
                       key: Optional[str] = None, enabled: bool = False,
                       verify_hostname: bool = True) -> Optional[ssl.SSLContext]:
    """TLS for a client: verify the server against ``ca`` (or the system CAs when only
    ``enabled``); ``cert``/``key`` present a client certificate. None when TLS is off."""
    if not (enabled or ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ConfigError("a TLS client certificate needs both tls_cert and tls_key")
    try:
        ctx = ssl.create_default_context(cafile=_check_file(ca, "TLS CA") if ca else None)
        ctx.check_hostname = verify_hostname
        if cert and key:  # both or neither (checked above)
            ctx.load_cert_chain(_check_file(cert, "TLS certificate"), _check_file(key, "TLS key"))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the TLS files: {exc.reason or exc}") from None
    return ctx


