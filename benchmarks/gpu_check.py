"""The one-run GPU check of moeconv (build, tests, memcheck, kernel timings, convert/eval/heal on CUDA); see gpu_check.sh."""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / ".stage"
PLACED = Path("/tmp/moeconv-stage")  # where device call 1 leaves part 1 for call 2
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SITE = Path("/tmp/site")  # the staged wheels, put on PYTHONPATH (the image's own packages stay untouched)
RECIPE = ["--recipe", "configs/dot-moe.yaml"]  # the README's (8,4) conversion
EVAL = ["--seqlen", "2048", "--max-tokens", "16384"]
PPL_TOLERANCE = 0.01
# -P: import the moeconv that pip installed (with its built kernels), never the source tree.
PY = [sys.executable, "-P"]
CLI = [*PY, "-m", "moeconv.cli"]


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: int
    needs: tuple[str, ...] = ()
    background: bool = False  # runs on its own half of the cores beside the foreground steps
    stdout: str | None = None  # file in RESULTS for stdout (JSON the step prints); else it goes to the log
    env: dict[str, str] = field(default_factory=dict)


def plan(results: Path, work: Path, gguf: Path) -> list[Step]:
    """Every step, in run order (the background ones start as soon as their needs are met)."""
    wheels = sorted(glob.glob(str(STAGE / "part2" / "wheels" / "*.whl")))
    cpu_moe, cuda_moe = work / "cpu-moe", work / "cuda-moe"
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    pip_wheels = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                  "--target", str(SITE), *wheels]
    return [
        Step("wheels", pip_wheels if wheels else ["missing", "no wheels in .stage/part2/wheels: run stage_gpu.sh"], 90),
        Step("install", [sys.executable, "-m", "pip", "install", "-v", "--no-index", "--no-deps", "--no-build-isolation",
                         "."], 300),
        Step("build", [*PY, "benchmarks/gpu_probe.py", "build"], 60, ("install",), stdout="build.json"),
        Step("model", ["join-parts", str(gguf)], 60),
        Step("convert_cpu", [*CLI, "convert", str(gguf), str(cpu_moe), *RECIPE, "--device", "cpu", "--force", "--json"],
             420, ("install", "model"), background=True, stdout="convert_cpu.json"),
        Step("eval_cpu", [*CLI, "eval", str(cpu_moe), *EVAL, "--device", "cpu", "--json", str(results / "eval_cpu.json")],
             240, ("convert_cpu",), background=True),
        # A module that fails to import must not stop the CUDA tests of the others.
        Step("gpu_tests", [*PY, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider", "tests",
                           "--continue-on-collection-errors", f"--junitxml={results / 'gpu_tests.xml'}"], 300, ("install",)),
        Step("sanitizer", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", *PY,
                           "benchmarks/gpu_probe.py", "smoke", "--device", "cuda"], 240, ("install",),
             env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),  # exact allocations, so memcheck sees every overrun
        Step("kernel_bench", [*PY, "benchmarks/kernel_speed.py", "--device", "cuda", "--dtype", "bfloat16", "--tokens",
                              "1,512,4096", "--budget", "0.1", "--json"], 240, ("install",), stdout="kernel_bench.json"),
        Step("convert_cuda", [*CLI, "convert", str(gguf), str(cuda_moe), *RECIPE, "--device", "cuda", "--force", "--json"],
             300, ("install", "model"), stdout="convert_cuda.json"),
        Step("eval_cuda", [*CLI, "eval", str(cuda_moe), *EVAL, "--device", "cuda", "--json", str(results / "eval_cuda.json")],
             150, ("convert_cuda",)),
        Step("heal_cuda", [*CLI, "heal", str(cuda_moe), str(work / "cuda-healed"), "--teacher", str(gguf), "--heal-tokens",
                           "16384", "--eval-tokens", "4096", "--device", "cuda", "--force", "--json"], 240,
             ("convert_cuda",), stdout="heal_cuda.json"),
        Step("cpu_compare", ["compare", str(results / "eval_cpu.json"), str(results / "eval_cuda.json")], 1,
             ("eval_cpu", "eval_cuda")),
    ]


def find_parts(dirs: list[Path]) -> tuple[Path | None, Path | None, Path | None]:
    """(part1, part2, sha256 file) as staged by stage_gpu.sh, each looked up in `dirs` in order."""

    def first(name: str) -> Path | None:
        return next((d / name for d in dirs if (d / name).is_file()), None)

    return first(f"{GGUF_NAME}.part1"), first(f"{GGUF_NAME}.part2"), first(f"{GGUF_NAME}.sha256")


def stage_dirs() -> list[Path]:
    return [STAGE / "part1", PLACED, STAGE / "part2"]


def join_parts(dest: Path, dirs: list[Path]) -> str:
    """Rejoins the two halves into dest and checks the digest; returns it, raises with the reason."""
    part1, part2, digest_file = find_parts(dirs)
    missing = [n for n, p in (("part 1", part1), ("part 2", part2), ("sha256", digest_file)) if p is None]
    if missing:
        raise FileNotFoundError(f"staged model incomplete: no {', '.join(missing)} in {', '.join(map(str, dirs))} "
                                "(part 1 comes from device call 1, which a cold machine forgot)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in (part1, part2):
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    want = digest_file.read_text().split()[0]
    if digest.hexdigest() != want:
        dest.unlink()
        raise ValueError(f"rejoined model has sha256 {digest.hexdigest()}, staged file says {want}: restage both halves")
    return want


class Run:
    """Runs the plan against one deadline, recording every step into RESULTS/summary.json as it ends."""

    def __init__(self, steps: list[Step], results: Path, budget_s: float):
        self.steps, self.results, self.budget_s = steps, results, budget_s
        self.deadline = time.monotonic() + budget_s
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.done = {s.name: threading.Event() for s in steps}
        cpus = sorted(os.sched_getaffinity(0))
        half = max(1, len(cpus) // 2)
        self.cpus = {True: cpus[:half], False: cpus[half:] or cpus}
        # No network there: a Hub lookup would only wait for its timeout.
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def record(self, step: Step, status: str, seconds: float = 0.0, **extra) -> None:
        with self.lock:
            self.records[step.name] = {"status": status, "seconds": round(seconds, 1), "log": f"{step.name}.log", **extra}
            self.write_summary()
        self.done[step.name].set()
        print(f"[gpu_check] {step.name}: {status} ({seconds:.0f} s) {extra.get('reason', '')}", flush=True)

    def write_summary(self) -> None:
        order = {s.name: i for i, s in enumerate(self.steps)}
        doc = {"build_seconds": self.records.get("install", {}).get("seconds"), "ppl_tolerance": PPL_TOLERANCE,
               "budget_s": self.budget_s, "cpus": len(self.cpus[False]) + len(self.cpus[True]), "python": sys.version,
               "steps": dict(sorted(self.records.items(), key=lambda kv: order[kv[0]]))}
        tmp = self.results / "summary.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.results / "summary.json")

    def run_step(self, step: Step) -> None:
        for need in step.needs:  # a background need is awaited; a foreground one has already ended
            self.done[need].wait(max(0.0, self.deadline - time.monotonic()))
        failed = [n for n in step.needs if self.records.get(n, {}).get("status") != "ok"]
        remaining = self.deadline - time.monotonic()
        if failed:
            return self.record(step, "skipped", reason=f"needs {', '.join(failed)}")
        if remaining < 10 and step.argv[0] not in INTERNAL:  # internal steps take a second
            return self.record(step, "skipped", reason="out of time (the whole run must end within its budget)")
        start = time.monotonic()
        log = self.results / f"{step.name}.log"
        if step.argv[0] in INTERNAL:
            try:
                extra = INTERNAL[step.argv[0]](*step.argv[1:])
            except Exception as exc:  # noqa: BLE001 - any failure is this step's result; the run goes on
                log.write_text(f"{type(exc).__name__}: {exc}\n")
                return self.record(step, "failed", time.monotonic() - start, reason=str(exc)[:300])
            log.write_text(json.dumps(extra, indent=1) + "\n")
            return self.record(step, "ok" if extra.pop("ok", True) else "failed", time.monotonic() - start, **extra)
        timeout = min(step.timeout, remaining)
        cpus = self.cpus[step.background]
        env = {**self.env, "OMP_NUM_THREADS": str(len(cpus)), **step.env}
        with open(log, "w") as err, open(self.results / step.stdout if step.stdout else os.devnull, "w") as out:
            err.write(f"$ {shlex.join(step.argv)}\n")
            err.flush()
            try:
                proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=out if step.stdout else err, stderr=err,
                                        start_new_session=True)
            except OSError as exc:
                return self.record(step, "failed", reason=f"cannot start: {exc}")
            with contextlib.suppress(ProcessLookupError):  # a command that failed at once has already gone
                os.sched_setaffinity(proc.pid, cpus)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return self.record(step, "timeout", time.monotonic() - start, reason=f"killed after {timeout:.0f} s")
        extra = parse_result(step, self.results)
        self.record(step, "ok" if rc == 0 else "failed", time.monotonic() - start, rc=rc, **extra)

    def run(self) -> dict:
        background = [s for s in self.steps if s.background]
        # The chain waits for its needs itself; every step's timeout ends it by the deadline (+ a kill).
        chain = threading.Thread(target=lambda: [self.run_step(s) for s in background], daemon=True)
        chain.start()
        for step in self.steps:
            if not step.background:
                self.run_step(step)
        chain.join(max(0.0, self.deadline - time.monotonic()) + 15)
        for step in background:
            if step.name not in self.records:
                self.record(step, "timeout", reason="still running at the end of the budget")
        return self.records


def parse_result(step: Step, results: Path) -> dict:
    """The numbers a step's files hold, for the summary (absent files leave the record as it is)."""
    try:
        if step.name == "build":
            report = json.loads((results / "build.json").read_text())
            return {"cuda_kernels": report.get("cuda_build"), "archs": report.get("elf_archs"), "gpu": report.get("gpu")}
        if step.name == "gpu_tests":
            suite = ET.parse(results / "gpu_tests.xml").getroot().iter("testsuite")
            return {k: sum(int(s.get(k, 0)) for s in suite) for k in ("tests", "failures", "errors", "skipped")}
        if step.name == "sanitizer":
            lines = [ln for ln in (results / "sanitizer.log").read_text().splitlines() if "ERROR SUMMARY" in ln]
            return {"sanitizer": lines[-1].strip() if lines else "no ERROR SUMMARY line"}
        if step.name == "kernel_bench":
            doc = json.loads((results / "kernel_bench.json").read_text())
            rows = [f"{r['shape']} T={r['T']}: moe {r['moe_ffn_ms']} ms, dense {r['dense_ms']} ms, grouped_mm "
                    f"{r['grouped_mm_ms']} ms" for r in doc["rows"]]
            return {"copy_gb_s": doc["meta"].get("copy_gb_s"), "rows": rows}
        if step.name.startswith("eval_"):
            return {"ppl": eval_ppl(results / f"{step.name}.json")}
    except (OSError, ValueError, KeyError, ET.ParseError) as exc:
        return {"parse_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {}


def eval_ppl(path: Path) -> float:
    return float(json.loads(Path(path).read_text())["results"][0]["perplexity"]["ppl"])


def compare(cpu_json: str, cuda_json: str) -> dict:
    cpu, cuda = eval_ppl(Path(cpu_json)), eval_ppl(Path(cuda_json))
    rel = abs(cuda / cpu - 1.0)
    return {"ok": rel <= PPL_TOLERANCE, "ppl_cpu": cpu, "ppl_cuda": cuda, "rel_diff": round(rel, 5)}


def model_step(dest: str) -> dict:
    return {"sha256": join_parts(Path(dest), stage_dirs()), "path": dest}


def missing(reason: str) -> dict:
    raise FileNotFoundError(reason)


INTERNAL = {"join-parts": model_step, "compare": compare, "missing": missing}


def validate(steps: list[Step]) -> list[str]:
    """Problems with the planned commands, found without a GPU: unknown CLI flags, missing files, no gpu marker."""
    import importlib.util

    import typer.main

    from moeconv.cli.app import app

    spec = importlib.util.spec_from_file_location("moeconv_bench_kernels", REPO / "benchmarks" / "kernel_speed.py")
    kernels = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
    spec.loader.exec_module(kernels)
    problems = []
    commands = typer.main.get_command(app).commands
    for step in steps:
        argv = step.argv
        if argv[:len(CLI)] == CLI:
            name, args = argv[len(CLI)], argv[len(CLI) + 1:]
            try:
                commands[name].make_context(name, list(args))
            except Exception as exc:  # noqa: BLE001 - click's or typer's vendored click's errors: any is a problem
                problems.append(f"{step.name}: moeconv {name} rejects {shlex.join(args)}: {exc}")
        if "benchmarks/kernel_speed.py" in argv:
            try:
                kernels.build_parser().parse_args(argv[argv.index("benchmarks/kernel_speed.py") + 1:])
            except SystemExit:
                problems.append(f"{step.name}: benchmarks/kernel_speed.py rejects its arguments")
    for path in ("configs/dot-moe.yaml", "tests", "setup.py"):
        if not (REPO / path).exists():
            problems.append(f"{path} is missing")
    if '"gpu:' not in (REPO / "pyproject.toml").read_text():
        problems.append("pytest marker 'gpu' is not registered in pyproject.toml")
    return problems


def dry_run(steps: list[Step]) -> int:
    part1, part2, digest = find_parts(stage_dirs())
    wheels = glob.glob(str(STAGE / "part2" / "wheels" / "*.whl"))
    print(f"staged: part1 {part1 or 'MISSING'}; part2 {part2 or 'MISSING'}; sha256 {digest or 'MISSING'}; "
          f"{len(wheels)} wheels (bash benchmarks/stage_gpu.sh stages them)")
    for step in steps:
        where = "background, half the cores" if step.background else "foreground"
        needs = f"; needs {', '.join(step.needs)}" if step.needs else ""
        print(f"[step] {step.name} ({where}, timeout {step.timeout} s{needs}): {shlex.join(step.argv)}")
    problems = validate(steps)
    for problem in problems:
        print(f"[invalid] {problem}")
    print("dry run: plan valid" if not problems else f"dry run: {len(problems)} problem(s)")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="?", type=Path, help="folder for every log and summary.json")
    parser.add_argument("--dry-run", action="store_true", help="print and validate the plan; run nothing")
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole run (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeconv-gpu-work"), help="checkpoints (not kept)")
    parser.add_argument("--place-part1", action="store_true", help="device call 1: keep part 1 of the model in /tmp")
    args = parser.parse_args()
    if args.place_part1:
        part1 = find_parts([STAGE / "part1"])[0]
        if part1 is None:
            print("no .stage/part1 here: carry it (carry [\".stage/part1\"])")
            return 1
        PLACED.mkdir(parents=True, exist_ok=True)
        shutil.copy(part1, PLACED / part1.name)
        print(f"placed {part1.name} ({part1.stat().st_size} bytes) in {PLACED}; run device call 2 now")
        return 0
    if args.results is None:
        parser.error("give a RESULTS folder")
    steps = plan(args.results.resolve(), args.work.resolve(), args.work.resolve() / GGUF_NAME)
    if args.dry_run:
        return dry_run(steps)
    args.results.mkdir(parents=True, exist_ok=True)
    records = Run(steps, args.results.resolve(), args.budget).run()
    for step in steps:  # the device tool returns the output's tail: the numbers are here even if no file comes back
        r = records[step.name]
        extra = {k: v for k, v in r.items() if k not in ("status", "seconds", "log", "rows")}
        print(f"{step.name:13} {r['status']:8} {r['seconds']:6.0f} s  {json.dumps(extra)}")
    print("\n".join(records.get("kernel_bench", {}).get("rows", [])))
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
