"""One graph of a bundle run on a provider in its own process (``validate --sample``, ``sampled``).

The process reads its inputs from an ``.npz`` the parent wrote (key ``<sample index>/<input name>``), writes one
``.npz`` of outputs per sample beside it, and reports on ``events`` (a multiprocessing queue):
  ("ready", graph, seconds to create the session)
  ("sample", graph, index, seconds of that run)
  ("done", graph, peak RSS of this process in bytes, or None where /proc cannot tell)
  ("error", graph, one-line message)
A crash (the emulated HTP has segfaulted on graphs it mis-compiled, docs/qnn_htp.md) reports nothing: the parent sees
the exit code. Only numpy, onnxruntime and the runtime are imported here, so a process starts in about a second.
"""

from __future__ import annotations

import time
from pathlib import Path


def input_key(index: int, name: str) -> str:
    return f"{index:05d}/{name}"


def output_path(folder: Path, graph: str, index: int) -> Path:
    return folder / f"{graph}.out.{index:05d}.npz"


def peak_rss_bytes() -> int | None:
    """VmHWM of this process (ru_maxrss would report the parent's size: Linux carries it across fork and exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_graph(bundle: str, graph: str, inputs: str, provider: str, threads: int, events) -> None:
    """Run ``graph`` of ``bundle`` on ``provider`` over every sample in ``inputs``; see the module docstring."""
    import numpy as np

    from ..contract.manifest import read_manifest
    from ..errors import CwExportError
    from ..runtime.sessions import bundle_session

    try:
        manifest = read_manifest(Path(bundle))
        names = [o["name"] for o in manifest["graphs"][graph]["outputs"]]
        start = time.perf_counter()
        session = bundle_session(bundle, manifest, graph, provider, threads=threads)
        events.put(("ready", graph, time.perf_counter() - start))
        feeds: dict[int, dict] = {}
        with np.load(inputs) as data:
            for key in data.files:
                index, _, name = key.partition("/")
                feeds.setdefault(int(index), {})[name] = data[key]
        for index in sorted(feeds):
            start = time.perf_counter()
            outputs = session.run(names, feeds[index])
            seconds = time.perf_counter() - start
            np.savez(output_path(Path(inputs).parent, graph, index), **dict(zip(names, outputs)))
            events.put(("sample", graph, index, seconds))
        events.put(("done", graph, peak_rss_bytes()))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it, once
        return
    except CwExportError as exc:
        events.put(("error", graph, str(exc)))
    except Exception as exc:  # noqa: BLE001 - anything onnxruntime raises becomes the graph's one-line failure
        events.put(("error", graph, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
