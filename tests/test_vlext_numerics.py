"""Pinned CPU numerics (vlext.numerics): every process the demo and the seeds tool start computes with AVX2
kernels and a fixed thread count, whatever the caller's environment says, unless the user opts out with
``--native-kernels`` (issue 27: the toy figures differed between an AVX-512 and an AVX2 machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlext import demo, parts, seeds
from vlext.numerics import NATIVE_VARIABLE, PINNED, numerics_record, pinned_environment

REPO = Path(__file__).resolve().parents[1]
PROBED = sorted([*PINNED, "OMP_NUM_THREADS", "MKL_NUM_THREADS", NATIVE_VARIABLE])
PROBE = (
    "import json, os, torch; print('PROBE ' + json.dumps({'capability': "
    "torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads(), "
    f"'env': {{k: os.environ.get(k) for k in {PROBED!r}}}}}))"
)


def _native_capability() -> str:
    env = {k: v for k, v in os.environ.items() if k not in PINNED and k != NATIVE_VARIABLE}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.split("PROBE ", 1)[1])["capability"]


@pytest.fixture(scope="module")
def native_capability():
    capability = _native_capability()
    if capability not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU's ATen capability is {capability}: AVX2 cannot be pinned here")
    return capability


def test_the_pinned_environment_overrides_the_callers_kernels_and_threads():
    base = {"PATH": "/bin", "ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "8", "MKL_CBWR": "AUTO"}
    env = pinned_environment(base, threads=1)
    assert env["PATH"] == "/bin"
    assert {k: env[k] for k in PINNED} == PINNED and PINNED["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert NATIVE_VARIABLE not in env
    assert numerics_record(env)["pinned"] is True


@pytest.mark.parametrize(
    "base", [{"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}, {NATIVE_VARIABLE: "1"}]
)
def test_native_kernels_remove_every_pin_and_say_so(base):
    env = pinned_environment(base, threads=2, native=NATIVE_VARIABLE not in base)
    assert not set(PINNED) & set(env)
    assert env[NATIVE_VARIABLE] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert numerics_record(env) == {
        "pinned": False,
        "environment": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    }


class _Probe:
    """Starts the probe instead of each demo part, with the environment the driver gave the part."""

    def __init__(self):
        self.commands = []
        self.popen = subprocess.Popen

    def __call__(self, cmd, **kwargs):
        self.commands.append(cmd)
        return self.popen([sys.executable, "-c", PROBE], **kwargs)


def _probes(stdout: str) -> list[dict]:
    return [json.loads(line.split("PROBE ", 1)[1]) for line in stdout.splitlines() if "PROBE " in line]


@pytest.mark.slow  # four torch imports in child processes
@pytest.mark.parametrize("native", [False, True])
def test_every_part_the_demo_and_seeds_start_gets_the_pinning_or_the_named_opt_out(
    native, native_capability, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # a caller's setting does not leak into a part
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    probe = _Probe()
    monkeypatch.setattr(parts.subprocess, "Popen", probe)
    flag = ["--native-kernels"] if native else []
    demo.main(["--out", str(tmp_path / "demo"), "--quick", "--only", "clip_ext", "lavis_ext", *flag])
    seeds.main(["--part", "clip_ext", "--seeds", "2", "--quick", "--out", str(tmp_path / "seeds"), *flag])
    found = _probes(capsys.readouterr().out)
    assert len(found) == len(probe.commands) == 4  # two demo parts, two seeds
    assert all(("--native-kernels" in cmd) == native for cmd in probe.commands)
    for child in found:
        assert child["threads"] == 1 and child["env"]["OMP_NUM_THREADS"] == "1"
        if native:
            assert child["capability"] == native_capability
            assert child["env"]["ATEN_CPU_CAPABILITY"] is None and child["env"][NATIVE_VARIABLE] == "1"
        else:
            assert child["capability"] == "AVX2"
            assert {k: child["env"][k] for k in PINNED} == PINNED
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["numerics"]["pinned"] is (not native)


@pytest.mark.slow  # two processes that import torch
def test_a_part_run_directly_pins_itself_before_torch_is_imported(native_capability, tmp_path):
    script = (
        "import sys, vlext.demo as d\n"
        "def fake(run, out, quick, seed, config=None):\n"
        f"    exec({PROBE!r}, {{}})\n"
        "    return {'status': 'ok'}\n"
        "d.run_part = fake\n"
        "sys.exit(d.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "3"}
    for extra, capability in (([], "AVX2"), (["--native-kernels"], native_capability)):
        proc = subprocess.run(
            [sys.executable, "-c", script, "--part", "clip_ext", "--out", str(tmp_path), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        (child,) = _probes(proc.stdout)
        assert child["capability"] == capability and child["threads"] == 1
