#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the hand-made hostile inputs of tests/data/fuzz_regressions/{msgpack,safetensors}/.

Each file is one fault that a loader must refuse with linen::io_error, quickly and
without allocating what the input declares. Standard library only. Run from this
directory:  python3 make_hostile_inputs.py
Crash reproducers found by the fuzzers are saved beside these as crash-<sha1>
(see README.md); this script does not touch them.
"""
import struct


def w(path, data):
    with open(path, "wb") as f:
        f.write(data)
    print(path, len(data))


def s(x):  # msgpack fixstr
    x = x.encode() if isinstance(x, str) else x
    assert len(x) < 32
    return bytes([0xA0 | len(x)]) + x


def ndarray(shape, dtype, data, code=1):  # ext 8 holding [shape, dtype, bin 8 data]
    p = bytes([0x90 | len(shape)]) + b"".join(bytes([d]) for d in shape) + s(dtype) + bytes([0xC4, len(data)]) + data
    p = bytes([0x93]) + p
    return bytes([0xC7, len(p), code]) + p


def st(header, data=b""):  # safetensors image
    h = header.encode()
    return struct.pack("<Q", len(h)) + h + data


# msgpack
w("msgpack/map32_4g_entries.bin", bytes([0xDF, 0xFF, 0xFF, 0xFF, 0xFF]))
w("msgpack/ext32_4g_payload.bin", bytes([0x81]) + s("a") + bytes([0xC9, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
w("msgpack/str32_past_end.bin", bytes([0x81, 0xDB, 0x7F, 0xFF, 0xFF, 0xFF]) + b"abc")
w("msgpack/array_nesting_10000.bin", bytes([0x81]) + s("a") + bytes([0x91]) * 10000 + bytes([0xC0]))
w("msgpack/map_nesting_100.bin", (bytes([0x81]) + s("m")) * 100 + bytes([0x80]))
w("msgpack/chunk_marker_false.bin",
  bytes([0x81]) + s("emb") + bytes([0x83]) + s("__msgpack_chunked_array__") + bytes([0xC2])
  + s("shape") + bytes([0x81]) + s("0") + bytes([2])
  + s("chunks") + bytes([0x81]) + s("0") + ndarray([2], "uint8", b"\x01\x02"))
w("msgpack/shape_overflow.bin",
  bytes([0x81]) + s("w") + bytes([0xC7, 30, 1, 0x93, 0x93, 0xCF]) + b"\x00\x00\x00\x01\x00\x00\x00\x00"
  + bytes([0xCF]) + b"\x00\x00\x00\x01\x00\x00\x00\x00" + bytes([0x02]) + s("uint8") + bytes([0xC4, 0]))
w("msgpack/duplicate_keys.bin",
  bytes([0x82]) + s("w") + ndarray([1], "uint8", b"\x01") + s("w") + ndarray([1], "uint8", b"\x02"))
w("msgpack/complex_ext2.bin", bytes([0x81]) + s("c") + bytes([0xD7, 0x02]) + b"\x92\xCB" + b"\x00" * 6)

# safetensors
w("safetensors/header_length_max.bin", b"\xFF" * 8 + b"{}")
w("safetensors/header_nesting_10000.bin", st("[" * 10000 + "]" * 10000))
w("safetensors/offsets_past_end.bin",
  st('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}}', b"\x01"))
w("safetensors/shape_overflow.bin",
  st('{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'))
w("safetensors/nul_in_header.bin", st('{"a\x00":{}}'))
