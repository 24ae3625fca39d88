"""Read a JSON document whose top level is an object one member at a time, and each array
member one element at a time, so that a file of millions of records never sits in memory.

A COCO instances file is one object whose ``images`` and ``annotations`` arrays hold every
record of the set; ``json.loads`` holds all of them as Python objects at once (about 1.8 KB
per crop). Here at most one element and one read block are held. Each element is decoded by
the standard library's own decoder (``json.JSONDecoder.raw_decode``), so every value is
exactly what ``json.loads`` gives: big integers, floats to the last bit, and the ``NaN`` and
``Infinity`` that ``json.dumps`` writes for non-finite floats (streaming parsers built on
yajl refuse those, yet the validator must see them to count such boxes). Only the framing
(the braces, brackets, colons and commas of the top level and of its arrays) is read here.
The encoding is detected as ``json.loads`` detects it for bytes, and invalid JSON raises
:class:`InvalidJson` naming the line, column and character in the whole document.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, BinaryIO, Iterator

_DECODER = json.JSONDecoder()
_WHITESPACE = json.decoder.WHITESPACE
_BLOCK = 1 << 20
_NUMBER_TAIL = 3
"""A number cut by a block end can leave at most two unread characters of its own (``e-``)
after what ``raw_decode`` took: a value that ends this close to the end is read again with
the next block."""


_CUT_REACH = 16
"""How far before the window's end a decoding error can come from the end cutting a valid
value: the longest literal (``-Infinity``), a ``\\uXXXX`` escape, a number's tail."""


def _may_be_cut(buf: str, exc: json.JSONDecodeError) -> bool:
    """Whether more text could make the value at the error valid: a string still open at the
    window's end, or an error close to it. Any other error is in the text already read, and
    is raised at once rather than after reading (and holding) the rest of the file."""
    return exc.msg.startswith("Unterminated string") or len(buf) - exc.pos < _CUT_REACH


class InvalidJson(ValueError):
    """The document is not valid JSON; the message is ``json``'s, positioned in the whole file."""


class _Text:
    """The decoded text of a binary file as a window that moves forward as it is read."""

    def __init__(self, fh: BinaryIO, digest: Any = None) -> None:
        self._fh, self._digest = fh, digest
        self._decoder: codecs.IncrementalDecoder | None = None
        self.buf, self.pos, self.eof, self._bytes = "", 0, False, 0
        self._base, self._lines, self._last_newline = 0, 0, -1  # what was dropped before buf

    def read_more(self) -> bool:
        """Append at least a block, and as much as is already held (so that a value read again
        after each block costs linear time); False at the end of the file."""
        if self.eof:
            return False
        data = self._fh.read(max(_BLOCK, len(self.buf) - self.pos, 4))  # 4: the encoding's mark
        if self._digest is not None:
            self._digest.update(data)
        if self._decoder is None:  # as json.loads detects it for bytes
            encoding = json.detect_encoding(data)
            self._decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
            # utf-8-sig places decoding errors after its mark, as json.loads reports them
            self._bytes = -len(codecs.BOM_UTF8) if encoding == "utf-8-sig" else 0
        before = max(self._bytes, 0) - len(self._decoder.getstate()[0])  # where the decoder's input starts
        self._bytes += len(data)
        try:
            text = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:  # placed in the whole file, worded as json.loads words it
            start, end = before + exc.start, before + exc.end
            at = (
                f"byte 0x{exc.object[exc.start]:02x} in position {start}"
                if exc.end - exc.start == 1
                else f"bytes in position {start}-{end - 1}"
            )
            raise InvalidJson(f"'{exc.encoding}' codec can't decode {at}: {exc.reason}") from None
        self.eof = not data
        self._drop()
        self.buf += text
        return True

    def _drop(self) -> None:
        done = self.buf[: self.pos]
        newline = done.rfind("\n")
        if newline >= 0:
            self._lines += done.count("\n")
            self._last_newline = self._base + newline
        self._base += self.pos
        self.buf, self.pos = self.buf[self.pos :], 0

    def peek(self) -> str:
        """The next character after whitespace ('' at the end of the file), not consumed."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.read_more():
                return self.buf[self.pos : self.pos + 1]

    def expect(self, chars: str, message: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            raise self.error(message, self.pos)
        self.pos += 1
        return char

    def value(self) -> Any:
        """Decode the value at the cursor, reading more while it is cut by the window's end."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if _may_be_cut(self.buf, exc) and self.read_more():
                    continue
                raise self.error(exc.msg, exc.pos) from None
            except ValueError as exc:  # an integer longer than Python converts
                if self.buf[-1:].isdigit() and self.read_more():  # whole, for the message's digit count
                    continue
                raise self.error(str(exc), self.pos) from None
            if len(self.buf) - end < _NUMBER_TAIL and self.read_more():
                continue
            self.pos = end
            return value

    def error(self, message: str, pos: int) -> InvalidJson:
        """``message`` at ``pos`` in the window, worded as :class:`json.JSONDecodeError` words it."""
        newline = self.buf.rfind("\n", 0, pos)
        last = self._base + newline if newline >= 0 else self._last_newline
        at = self._base + pos
        line = self._lines + self.buf.count("\n", 0, pos) + 1
        return InvalidJson(f"{message}: line {line} column {at - last} (char {at})")


class ArrayStream:
    """The elements of one array member, decoded one at a time; read it to its end before
    asking the :class:`ObjectStream` for the next member (it does so itself otherwise)."""

    def __init__(self, text: _Text) -> None:
        self._text, self._done = text, False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        text = self._text
        if self._done:
            raise StopIteration
        if text.peek() == "]":
            text.pos += 1
            self._done = True
            raise StopIteration
        value = text.value()
        if text.expect(",]", "Expecting ',' delimiter") == "]":
            self._done = True
        elif text.peek() == "]":
            raise text.error("Expecting value", text.pos)
        return value

    def drain(self) -> None:
        for _ in self:
            pass


class ObjectStream:
    """The ``(key, value)`` members of the top-level object, in file order; an array value is
    an :class:`ArrayStream`, any other value is decoded whole."""

    def __init__(self, text: _Text) -> None:
        self._text = text

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        text = self._text
        if text.peek() == "}":
            text.pos += 1
        else:
            while True:
                if text.peek() != '"':
                    raise text.error("Expecting property name enclosed in double quotes", text.pos)
                key = text.value()
                text.expect(":", "Expecting ':' delimiter")
                if text.peek() == "[":
                    text.pos += 1
                    array = ArrayStream(text)
                    yield key, array
                    array.drain()
                else:
                    yield key, text.value()
                if text.expect(",}", "Expecting ',' delimiter") == "}":
                    break
        if text.peek():
            raise text.error("Extra data", text.pos)


def open_document(fh: BinaryIO, digest: Any = None) -> ObjectStream | Any:
    """An :class:`ObjectStream` over ``fh`` when its top level is an object, else the whole
    decoded value. ``digest`` (a :mod:`hashlib` object), when given, is fed every byte read."""
    text = _Text(fh, digest)
    first = text.peek()
    if first == "{":
        text.pos += 1
        return ObjectStream(text)
    if not first:
        raise text.error("Expecting value", text.pos)
    value = text.value()
    if text.peek():
        raise text.error("Extra data", text.pos)
    return value
