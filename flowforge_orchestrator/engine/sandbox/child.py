"""The expression sandbox's child process: evaluates CEL requests read from stdin.

Started by `engine.sandbox.Sandbox` as `python -m flowforge_orchestrator.engine.sandbox.child
MEMORY_BYTES MAX_RESULT_BYTES CPU_SECONDS`. Frames both ways are a 4-byte big-endian length
and a JSON body (UTF-8, lone surrogates passed through). It answers `{"kind": "ready"}` once
started, then one answer per request `{"s": source, "v": variables}`:

    {"kind": "value", "value": ...}        the result, JSON-ready (timestamps as RFC 3339)
    {"kind": "error", "message": ...}      CEL's own error (no such key, bad types, ...)
    {"kind": "too_large", "size": n}       the result's JSON is over MAX_RESULT_BYTES
    {"kind": "memory"}                     over MEMORY_BYTES (when Python sees it; CEL's
                                           own allocations abort the process instead)

Its address space is capped (RLIMIT_AS) and so is its CPU time per request (RLIMIT_CPU, a
backstop should the parent die mid-evaluation); the parent enforces the real deadline by
killing it. Only the standard library is imported before the limits are set, and the `cel`
package's command-line half (prompt_toolkit, ~150 ms) never: a fresh child is ready in
about 0.1 s.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import struct
import sys
import types
from typing import Any, BinaryIO

__all__ = ["main", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame's body, or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    body = stream.read(length)
    return body if len(body) == length else None


def write_frame(stream: BinaryIO, body: bytes) -> None:
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def encode(value: Any) -> bytes:
    """JSON bytes of a frame body (lone surrogates kept: the parent checks values itself)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def _load_cel() -> None:
    """Import the `cel` extension without the package's command-line module."""
    if "cel" in sys.modules:
        return
    spec = importlib.util.find_spec("cel")
    if spec is None or not spec.submodule_search_locations:
        return  # let `import cel` fail with its own message
    package = types.ModuleType("cel")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["cel"] = package
    from cel import cel as native  # the Rust extension: compile, OptionalValue, ...

    for name in dir(native):
        if not name.startswith("__"):
            setattr(package, name, getattr(native, name))


def _answer(request: bytes, max_result: int) -> dict[str, Any] | bytes:
    from flowforge_orchestrator.core.expressions.cost import weigh
    from flowforge_orchestrator.core.expressions.templates import compile_expression, to_json_value
    from flowforge_orchestrator.errors import ExpressionError

    data = json.loads(request.decode("utf-8", "surrogatepass"))
    try:
        value = compile_expression(data["s"]).run(data["v"])
    except ExpressionError as exc:
        return {"kind": "error", "message": exc.reason}
    try:
        value = to_json_value(value)
    except ValueError as exc:
        return {"kind": "error", "message": f"result is not JSON: {exc}"}
    except RecursionError:
        return {"kind": "error", "message": "result is nested too deeply"}
    # Its text alone may be over the limit: say so before spending time encoding it.
    least = weigh(value, cap=max_result)
    if least.chars + least.nodes > max_result:
        return {"kind": "too_large", "size": least.chars + least.nodes}
    body = encode(value)
    if len(body) > max_result:
        return {"kind": "too_large", "size": len(body)}
    return b'{"kind":"value","value":' + body + b"}"


def _cpu_backstop(seconds: int) -> None:
    """Let this request use `seconds` more CPU: a runaway child dies on its own."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = used + seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def main(argv: list[str] | None = None) -> None:
    memory, max_result, cpu_seconds = (int(arg) for arg in (argv or sys.argv[1:])[:3])
    _load_cel()
    from flowforge_orchestrator.core.expressions import templates  # noqa: F401  warm the import

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or memory < hard:
        resource.setrlimit(resource.RLIMIT_AS, (memory, hard))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    write_frame(stdout, b'{"kind":"ready"}')
    while (request := read_frame(stdin)) is not None:
        _cpu_backstop(cpu_seconds)
        try:
            answer = _answer(request, max_result)
            body = answer if isinstance(answer, bytes) else encode(answer)
        except MemoryError:
            body = b'{"kind":"memory"}'
        write_frame(stdout, body)


if __name__ == "__main__":
    main()
