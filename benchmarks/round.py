"""The server round at model scale: Phalanx's ``aggregate_train`` against Flower 1.42's strategies.

Usage::

    python benchmarks/round.py --n 20,100 --d 1M,11.2M --repeats 3 --markdown /tmp/round.md --json /tmp/round.json
    python benchmarks/round.py --files --d 11.2M --files-rounds 200     # the files a round writes
    python benchmarks/round.py --device cuda ...                         # Phalanx stacks on CUDA

For each (n, d): one fixed-seed global model (``d = 11.2M`` is ResNet-18's state, BatchNorm and
``num_batches_tracked`` included, ``client.models.resnet18``; ``d = 1M`` a 4-layer MLP's), n
replies ``global + 0.01 * noise`` as Flower Messages (one ArrayRecord "arrays", one MetricRecord
"metrics" with ``num-examples`` and ``train-loss``, ``reply_to`` the train message, exactly what a
ClientApp returns), built afresh before every timed call (FedMedian and FedTrimmedAvg empty the
replies' arrays in place). Then, interleaved in this one process, repeat by repeat:

- Phalanx: ``RobustStrategy(rule, num_byzantine=f).aggregate_train(round, replies)`` (after
  ``prepare_round``, which is not timed), f = max(1, n // 10), rules ``mean``, ``trimmed-mean``,
  ``median``, ``krum``;
- Flower: ``FedAvg``, ``FedTrimmedAvg(beta=f/n)``, ``FedMedian``, ``Krum(num_malicious_nodes=f)``
  from ``flwr.serverapp.strategy``, their own ``aggregate_train`` on the same replies.

Reported: the median of ``--repeats`` calls, the ratio Flower / Phalanx, Phalanx's stage times
(``strategy.stage_seconds``: decode, validate, stack, hash (the worker thread's seconds, overlapped
with decoding and the rule), hash_wait (what the round then waited for it), score, aggregate,
record; stages a version does not time show as "-"), and the peak memory of the call: VmHWM (reset through
``/proc/self/clear_refs`` just before the call) minus VmRSS just before it, plus the bytes of the
replies' own arrays (a server holds them while it aggregates); shown as a multiple of the (n, d)
float32 stack; Phalanx's stack kept from the previous round (``server.stacking.empty_stack``) is
resident before the call and added to its peak. glibc's mmap threshold is fixed at 128 KiB and
the heap trimmed before each call, so freed buffers go back to the system and cannot hide an
allocation. The first repeat of each rule maps a fresh stack; later ones reuse the kept one, as
a server's later rounds do (the median of 3 is such a round).

``--files`` measures the files a round writes with a real run directory (``server.run.RobustRun``):
the audit record, the checkpoint (fsync'd) and whatever else ``_persist`` writes, at round 1 and
after ``--files-rounds`` rounds of records, from a real round's record.

Every table carries the machine, the load average (``uptime``) before and after, and the command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHALANX_RULES = {"mean": "FedAvg", "trimmed-mean": "FedTrimmedAvg", "median": "FedMedian", "krum": "Krum"}
STAGES = ("decode", "validate", "stack", "hash", "hash_wait", "score", "aggregate", "record")


# ----------------------------------------------------------------------------------------- inputs
def parse_d(text: str) -> int:
    text = text.strip().upper()
    scale = 1
    if text.endswith("M"):
        scale, text = 1_000_000, text[:-1]
    elif text.endswith("K"):
        scale, text = 1_000, text[:-1]
    return int(round(float(text) * scale))


def model_shapes(d: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Entry name -> (shape, dtype) of a model with about ``d`` floating-point parameters."""
    if abs(d - 11_200_000) <= 100_000:
        from client.models import resnet18

        return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in resnet18().state_dict().items()}
    # An MLP whose weights add up to d: hidden h with 784*h + h*h + h*10 + biases ~ d.
    h = int((-(794) + (794 ** 2 + 4 * d) ** 0.5) / 2)
    shapes = {"fc1.weight": ((h, 784), "float32"), "fc1.bias": ((h,), "float32"),
              "fc2.weight": ((h, h), "float32"), "fc2.bias": ((h,), "float32"),
              "fc3.weight": ((10, h), "float32")}
    used = sum(int(np.prod(s)) for s, _ in shapes.values())
    shapes["fc3.bias"] = ((max(1, d - used),), "float32")
    return shapes


def float_dim(shapes) -> int:
    return sum(int(np.prod(s)) for s, dt in shapes.values() if dt.startswith("float"))


class Inputs:
    """A global model and the means to build n replies to it, as many times as needed."""

    def __init__(self, n: int, d: int, seed: int = 0) -> None:
        from flwr.app import Array, ArrayRecord

        self.n, self.shapes = n, model_shapes(d)
        self.d = float_dim(self.shapes)
        rng = np.random.default_rng(seed)
        self.base = {}
        for key, (shape, dtype) in self.shapes.items():
            if dtype.startswith("float"):
                self.base[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
            else:
                self.base[key] = np.full(shape, 10, dtype=dtype)
        self.global_arrays = ArrayRecord({k: Array(v) for k, v in self.base.items()})
        # One noise pool; client i reads it at its own offset and scale (cheap, distinct, fixed).
        self.noise = rng.standard_normal(self.d + 4 * n + 8, dtype=np.float32) * np.float32(0.01)
        self.nodes = list(range(1001, 1001 + n))

    def replies(self, messages: dict):
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        out = []
        for i, node in enumerate(self.nodes):
            arrays = ArrayRecord()
            offset = 4 * i
            scale = np.float32(1.0 + 0.02 * (i % 7))
            for key, (shape, dtype) in self.shapes.items():
                base = self.base[key]
                if dtype.startswith("float"):
                    size = base.size
                    value = base + scale * self.noise[offset:offset + size].reshape(shape)
                    offset += size
                    arrays[key] = Array(value.astype(dtype, copy=False))
                else:
                    arrays[key] = Array(np.asarray(base + (i % 3), dtype=base.dtype))
            content = RecordDict({"arrays": arrays,
                                  "metrics": MetricRecord({"num-examples": 50 + i, "train-loss": 0.5})})
            out.append(Message(content, reply_to=messages[node]))
        return out


# ----------------------------------------------------------------------------------------- memory
def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fixed_mmap_threshold() -> None:
    """Every allocation of 128 KiB or more from its own mmap, given back on free (glibc otherwise
    raises the threshold after a free and keeps freed buffers, which hides them from VmRSS)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- timing
def cached_stack_bytes() -> int:
    try:
        from server.stacking import cached_stack_bytes as held
    except ImportError:  # a Phalanx version without a kept stack
        return 0
    return held()


def flower_strategy(name: str, n: int, f: int):
    from flwr.serverapp import strategy as fs

    if name == "FedAvg":
        return fs.FedAvg()
    if name == "FedTrimmedAvg":
        return fs.FedTrimmedAvg(beta=f / n)
    if name == "FedMedian":
        return fs.FedMedian()
    if name == "Krum":
        return fs.Krum(num_malicious_nodes=f)
    raise ValueError(name)


def timed_call(inputs: Inputs, messages: dict, call, held=lambda: 0) -> dict:
    """Build fresh replies, reset the memory peak, run ``call(replies)``; seconds and peak bytes.

    ``held()``: bytes the call uses that were mapped before it (Phalanx's stack kept from the
    previous round): resident before the call, so VmHWM - VmRSS misses them; they are added."""
    gc.collect()
    trim()
    replies = inputs.replies(messages)
    # The replies' own buffers count: a server holds them while it aggregates.
    reply_bytes = sum(len(a.data) for m in replies for a in m.content["arrays"].values())
    gc.collect()
    trim()
    before = _status("VmRSS")
    kept = held()
    ok = reset_peak()
    started = time.perf_counter()
    out = call(replies)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM") - before + reply_bytes + kept if ok else None
    del replies, out
    gc.collect()
    return {"seconds": seconds, "peak_bytes": peak}


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def bench_config(n: int, d: int, rules: list[str], repeats: int, device: str, phalanx_only: tuple = ()) -> dict:
    import flwr
    from flwr.app import ConfigRecord

    from server.stacking import release_cached_stack
    from server.strategy import RobustStrategy

    release_cached_stack()
    f = max(1, n // 10)
    inputs = Inputs(n, d)
    stack_bytes = n * inputs.d * 4
    results: dict = {"n": n, "d": inputs.d, "f": f, "stack_bytes": stack_bytes, "flwr": flwr.__version__,
                     "rules": {}}
    strategies = {rule: RobustStrategy(rule, num_byzantine=f, seed=0, device=device, min_train_nodes=n,
                                       min_available_nodes=n) for rule in rules}
    for rule in rules:
        results["rules"][rule] = {"phalanx": [], "flower": [], "stages": [], "flower_name": PHALANX_RULES[rule]}
    for repeat in range(repeats):
        for rule in rules:
            strategy = strategies[rule]
            server_round = repeat + 1
            messages = {m.metadata.dst_node_id: m for m in
                        strategy.prepare_round(server_round, inputs.global_arrays, ConfigRecord(), inputs.nodes)}
            entry = results["rules"][rule]
            t = timed_call(inputs, messages, lambda r: strategy.aggregate_train(server_round, r),
                           held=cached_stack_bytes)
            record = strategy.last_record or {}
            if len(record.get("accepted", [])) != n:
                raise RuntimeError(f"Phalanx {rule}: accepted {len(record.get('accepted', []))} of {n}: "
                                   f"{record.get('rejected')}")
            entry["phalanx"].append(t)
            entry["stages"].append(dict(getattr(strategy, "stage_seconds", {}) or {}))
            if rule in phalanx_only:
                print(f"  n={n} d={inputs.d} {rule}: Phalanx {entry['phalanx'][-1]['seconds']:.3f} s "
                      f"(Flower's {PHALANX_RULES[rule]} not run: --phalanx-only)", flush=True)
                continue
            flower = flower_strategy(PHALANX_RULES[rule], n, f)
            entry["flower"].append(timed_call(inputs, messages, lambda r: flower.aggregate_train(server_round, r)))
            print(f"  n={n} d={inputs.d} {rule}: Phalanx {entry['phalanx'][-1]['seconds']:.3f} s, "
                  f"Flower {PHALANX_RULES[rule]} {entry['flower'][-1]['seconds']:.3f} s", flush=True)
    for rule, entry in results["rules"].items():
        entry["phalanx_s"] = statistics.median(t["seconds"] for t in entry["phalanx"])
        entry["flower_s"] = statistics.median(t["seconds"] for t in entry["flower"]) if entry["flower"] else None
        peaks = [t["peak_bytes"] for t in entry["phalanx"] if t["peak_bytes"] is not None]
        fpeaks = [t["peak_bytes"] for t in entry["flower"] if t["peak_bytes"] is not None]
        entry["phalanx_peak"] = max(peaks) if peaks else None
        entry["flower_peak"] = max(fpeaks) if fpeaks else None
        entry["stage_s"] = {s: statistics.median(st.get(s, 0.0) for st in entry["stages"])
                            for s in STAGES if any(s in st for st in entry["stages"])}
    return results


# ----------------------------------------------------------------------------------------- files
def bench_files(d: int, n: int, rounds: int) -> dict:
    """Time RobustRun._persist at round 1 and after ``rounds`` rounds (a real round's record)."""
    from flwr.app import ConfigRecord

    from server.run import RobustRun
    from server.strategy import RobustStrategy

    inputs = Inputs(n, d)
    strategy = RobustStrategy("trimmed-mean", num_byzantine=max(1, n // 10), seed=0, device="cpu",
                              min_train_nodes=n, min_available_nodes=n)
    out: dict = {"n": n, "d": inputs.d, "rounds": rounds, "per_round": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("ROUND_BENCH_TMP")) as tmp:
        run = RobustRun(strategy, tmp, config={"aggregator": "trimmed-mean"}, report=False)
        run._num_rounds = rounds
        run._open(inputs.global_arrays)
        arrays = inputs.global_arrays
        timings = []
        for server_round in range(1, rounds + 1):
            if server_round in (1, 2, rounds):
                messages = {m.metadata.dst_node_id: m for m in
                            strategy.prepare_round(server_round, arrays, ConfigRecord(), inputs.nodes)}
                replies = inputs.replies(messages)
                new, _ = strategy.aggregate_train(server_round, replies)
                del replies
                template = dict(strategy.last_record)
                template.update({"accuracy": 0.5, "loss": 1.0, "alerts": [], "central_metrics": {"loss": 1.0}})
            else:
                # Rounds in between: the same record again (what grows is their number, not their content).
                strategy.history.append(dict(template, round=server_round))
            record = dict(template, round=server_round)
            run.records.append(record)
            started = time.perf_counter()
            run._persist(server_round, arrays, record)
            seconds = time.perf_counter() - started
            if server_round in (1, 2, rounds) or server_round % 50 == 0:
                files = {p.name: p.stat().st_size for p in Path(tmp).iterdir() if p.is_file()}
                timings.append({"round": server_round, "seconds": seconds, "files": files,
                                "stages": dict(getattr(run, "persist_seconds", {}) or {})})
                print(f"  round {server_round}: persist {seconds:.3f} s {files}", flush=True)
        started = time.perf_counter()
        run._finish(arrays)
        out["finish_seconds"] = time.perf_counter() - started
        out["per_round"] = timings
    return out


# ----------------------------------------------------------------------------------------- output
def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def markdown(configs: list[dict], header: dict) -> str:
    lines = [f"Machine: {header['machine']}; device {header['device']}; Flower {header.get('flwr', '?')}.",
             f"Load before: `{header['load_before']}`; after: `{header['load_after']}`.",
             f"Command: `{header['command']}`", ""]
    lines += ["| n | d | rule | Phalanx s | Flower strategy | Flower s | Flower / Phalanx | Phalanx peak (x stack) "
              "| Flower peak (x stack) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        for rule, e in c["rules"].items():
            ratio = "-" if e["flower_s"] is None else f"{e['flower_s'] / e['phalanx_s']:.2f}"
            flower_s = "not run" if e["flower_s"] is None else f"{e['flower_s']:.3f}"
            pp = "-" if e["phalanx_peak"] is None else f"{_mib(e['phalanx_peak'])} MiB ({e['phalanx_peak'] / c['stack_bytes']:.2f}x)"
            fp = "-" if e["flower_peak"] is None else f"{_mib(e['flower_peak'])} MiB ({e['flower_peak'] / c['stack_bytes']:.2f}x)"
            lines.append(f"| {c['n']} | {c['d']:,} | {rule} | {e['phalanx_s']:.3f} | {e['flower_name']} | "
                         f"{flower_s} | {ratio} | {pp} | {fp} |")
    lines += ["", "Phalanx stages (median seconds):", "",
              "| n | d | rule | " + " | ".join(STAGES) + " |", "|---|---|---|" + "---|" * len(STAGES)]
    for c in configs:
        for rule, e in c["rules"].items():
            cells = [f"{e['stage_s'][s]:.3f}" if s in e["stage_s"] else "-" for s in STAGES]
            lines.append(f"| {c['n']} | {c['d']:,} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="20,100", help="comma list of client counts")
    parser.add_argument("--d", default="1M,11.2M", help="comma list of model sizes (11.2M = ResNet-18)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where Phalanx stacks and aggregates (cpu, cuda)")
    parser.add_argument("--rules", default=",".join(PHALANX_RULES), help="Phalanx rules (each against its Flower twin)")
    parser.add_argument("--max-stack-gib", type=float, default=6.0,
                        help="skip (n, d) whose float32 stack is larger (the replies double it, Flower more)")
    parser.add_argument("--phalanx-only", default="",
                        help="comma list of rules whose Flower twin is not run (e.g. krum where Flower's Krum "
                             "would need more memory than the machine has)")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--files", action="store_true", help="measure the files a round writes instead")
    parser.add_argument("--files-rounds", type=int, default=200)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; nothing to measure")
        return 0
    from flwr.supercore.task_identity import TaskIdentity

    # Messages carry the task identity a ServerApp runtime sets; outside one, set the same.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    fixed_mmap_threshold()
    header = {"machine": machine(), "device": args.device, "load_before": load(),
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    payload: dict = {"header": header}
    if args.files:
        payload["files"] = [bench_files(parse_d(d), int(n), args.files_rounds)
                            for d in args.d.split(",") for n in args.n.split(",")]
    else:
        configs = []
        rules = [r for r in args.rules.split(",") if r]
        for d in [parse_d(x) for x in args.d.split(",")]:
            for n in [int(x) for x in args.n.split(",")]:
                if n * d * 4 / 2**30 > args.max_stack_gib:
                    print(f"skipped n={n} d={d}: a {n * d * 4 / 2**30:.1f} GiB stack is over --max-stack-gib")
                    configs.append({"n": n, "d": d, "skipped": f"stack over {args.max_stack_gib} GiB"})
                    continue
                configs.append(bench_config(n, d, rules, args.repeats, args.device,
                                            tuple(r for r in args.phalanx_only.split(",") if r)))
        payload["configs"] = configs
        import flwr

        header["flwr"] = flwr.__version__
    header["load_after"] = load()
    if not args.files:
        text = markdown([c for c in payload["configs"] if "rules" in c], header)
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text)
    else:
        print(json.dumps(payload["files"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
