"""The Kubernetes protobuf wire format, as far as the gateway reads it.

`application/vnd.kubernetes.protobuf` bodies are `k8s\\x00` followed by a `runtime.Unknown` message
(1: TypeMeta, 2: the raw object). Protobuf carries field numbers, not names: readers that need an
object's fields (guardrails' body inspectors, kubectl's access reviews) decode just those by the
numbers of k8s.io/api's generated.proto, on top of `fields` here.
"""

from __future__ import annotations

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    """Bytes that are not well-formed protobuf; the message never quotes them."""


def varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtobufError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> dict[int, list]:
    """Field number -> values in order (ints for varints, bytes for the other wire types)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(data, pos)
        elif wire == 2:
            length, pos = varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError("truncated field")
            value, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(data):
                raise ProtobufError("truncated field")
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out
