"""experiments/canary.py: the verdict rules on constructed reports, the input checks, one
comparison in process and the command line (on the tiny Hugging Face models of
tests/fixtures/hf, which share one tokenizer). The end-to-end test on trained PPO policies is
tests/trainers/test_canary_stages.py."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from experiments import canary
from rlhf_jax import errors
from tests import cli_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = os.path.join(REPO, "tests", "fixtures", "hf")
LLAMA, GPT2 = f"hf:{HF}/llama", f"hf:{HF}/gpt2"

# ------------------------------------------------------------------ verdict on constructed


def _judge(name, rate, low, high):
  return dict(name=name, win_rate=rate, low=low, high=high, num_prompts=64)


def _report(
  judge=(0.7, 0.6, 0.8), panel=None, rm=None, kl=5.0, repetition=(0.02, 0.03), length=(20, 22)
):
  """A report as `compare` returns it, with only what `verdict` reads."""
  judges = {}
  if judge:
    judges["judge"] = _judge("gold", *judge)
  if panel:
    judges["panel"] = _judge("panel", *panel)
  if rm:
    judges["reward_model"] = _judge("reward model runs/reward", *rm)
  base_rep, cand_rep = repetition
  base_len, cand_len = length
  return {
    "judges": judges,
    "primary": canary.primary_judge({"judges": judges}),
    "kl": {"candidate_vs_baseline": kl},
    "repetition": {
      "baseline": {"frac": base_rep},
      "candidate": {"frac": cand_rep},
      "change": cand_rep - base_rep,
    },
    "length": {
      "baseline_tokens": base_len,
      "candidate_tokens": cand_len,
      "relative_change": cand_len / base_len - 1,
    },
  }


def test_promote_when_the_judge_prefers_the_candidate_and_no_detector_flags():
  report = _report(rm=(0.8, 0.7, 0.9))
  decision, reasons = canary.verdict(report)
  assert decision == canary.PROMOTE
  assert reasons[0].startswith("judge gold: win rate 0.70 [0.60, 0.80]")
  assert "lies above 0.5" in reasons[0]
  # The detectors that passed are listed, each with its figure and limit.
  assert reasons[1].startswith("no detector flags")
  for fragment in ("kl: KL(candidate || baseline) = 5.00", "--max_kl=20", "repetition:",
                   "length:", "reward hacking:"):  # fmt: skip
    assert fragment in reasons[1]


def test_hold_when_the_interval_straddles_one_half():
  decision, reasons = canary.verdict(_report(judge=(0.55, 0.45, 0.66)))
  assert decision == canary.HOLD
  assert reasons == [
    "judge gold: win rate 0.55 [0.45, 0.66] over 64 prompts straddles 0.5: not resolved"
  ]


def test_identical_policies_are_not_resolved():
  decision, reasons = canary.verdict(_report(judge=(0.5, 0.5, 0.5), kl=0.0))
  assert decision == canary.HOLD and "not resolved" in reasons[0]


def test_roll_back_when_the_interval_lies_below_one_half_with_the_detectors_that_flag():
  report = _report(judge=(0.2, 0.1, 0.3), rm=(0.99, 0.97, 1.0), kl=80.0)
  decision, reasons = canary.verdict(report)
  assert decision == canary.ROLL_BACK
  assert reasons[0].startswith("judge gold: win rate 0.20 [0.10, 0.30]")
  assert "lies below 0.5: the candidate is worse" in reasons[0]
  assert reasons[1].startswith("kl: KL(candidate || baseline) = 80.00")
  assert reasons[2].startswith("reward hacking: the reward model prefers the candidate")


@pytest.mark.parametrize(
  "change, detector, fragment",
  [
    (dict(kl=35.0), "kl", "= 35.00 nats per response > --max_kl=20"),
    (dict(repetition=(0.02, 0.4)), "repetition", "0.02 -> 0.40 (+0.38 > "),
    (dict(length=(20, 40)), "length", "20.0 -> 40.0 tokens (+100% > "),
    # The reward model prefers the candidate, the judge does not: hacking by the interval.
    (dict(judge=(0.52, 0.4, 0.64), rm=(0.9, 0.8, 0.97)), "reward hacking",
     "the reward model prefers the candidate (0.90 [0.80, 0.97]) but gold does not"),
    # Both prefer it, the reward model by far more: hacking by the gap.
    (dict(judge=(0.62, 0.52, 0.72), rm=(0.97, 0.93, 1.0)), "reward hacking",
     "reward-model win rate 0.97 - gold's 0.62 = +0.35 > --max_judge_gap=0.25"),
  ],
)  # fmt: skip
def test_each_detector_holds_a_candidate_the_judge_prefers(change, detector, fragment):
  report = _report(**change)
  decision, reasons = canary.verdict(report)
  assert decision == canary.HOLD
  flagged = [r for r in reasons if r.startswith(f"{detector}:")]
  assert len(flagged) == 1 and fragment in flagged[0], reasons
  names = [c["name"] for c in canary.checks(report) if c["flagged"]]
  assert names == [detector.replace(" ", "_")]


def test_the_primary_judge_is_the_judge_then_the_panel_then_the_reward_model():
  report = _report(judge=None, panel=(0.3, 0.2, 0.4), rm=(0.9, 0.8, 1.0))
  assert report["primary"] == "panel"
  decision, reasons = canary.verdict(report)
  assert decision == canary.ROLL_BACK and reasons[0].startswith("panel: win rate 0.30")
  assert any(r.startswith("reward hacking:") for r in reasons)
  only_rm = _report(judge=None, rm=(0.9, 0.8, 1.0))
  assert only_rm["primary"] == "reward_model"
  decision, reasons = canary.verdict(only_rm)
  # The reward model judging itself cannot be checked for hacking.
  assert decision == canary.PROMOTE
  assert reasons[0].startswith("reward model runs/reward: win rate 0.90")
  assert "reward hacking" not in reasons[1]


def test_no_judge_holds():
  decision, reasons = canary.verdict(_report(judge=None, kl=50.0))
  assert decision == canary.HOLD
  assert reasons[0].startswith("no judge") and reasons[1].startswith("kl:")


def test_thresholds_move_the_verdict_and_inf_switches_a_check_off():
  report = _report(kl=15.0)
  assert canary.verdict(report)[0] == canary.PROMOTE
  decision, reasons = canary.verdict(report, canary.Thresholds(max_kl=10.0))
  assert decision == canary.HOLD and "> --max_kl=10" in reasons[0]
  report = _report(repetition=(0.0, 0.9), length=(10, 30))
  off = canary.Thresholds(max_repetition_increase=math.inf, max_length_increase=math.inf)
  assert canary.verdict(report, off)[0] == canary.PROMOTE


def test_undefined_figures_are_left_out():
  report = _report(kl=float("nan"), repetition=(float("nan"), float("nan")))
  assert [c["name"] for c in canary.checks(report)] == ["length"]
  assert canary.verdict(report)[0] == canary.PROMOTE


def test_verdict_is_pure_and_with_verdict_records_it():
  report = _report(kl=30.0)
  before = copy.deepcopy(report)
  assert canary.verdict(report) == canary.verdict(report)
  assert report == before
  out = canary.with_verdict(report, canary.Thresholds(max_kl=40.0))
  assert out["verdict"] == canary.PROMOTE and out["thresholds"]["max_kl"] == 40.0
  assert report == before


# ------------------------------------------------------------------------------ input checks


def test_judges_that_need_testbed_prompts_are_refused_on_others():
  assert canary.check_judge("auto", testbed_prompts=True) == "gold"
  assert canary.check_judge("auto", testbed_prompts=False) is None
  assert canary.check_judge("none", testbed_prompts=True) is None
  with pytest.raises(errors.ConfigError, match="--judge=gold: the gold reward exists only"):
    canary.check_judge("gold", testbed_prompts=False)
  with pytest.raises(errors.ConfigError, match="--panel: the simulated rater panel"):
    canary.check_judge(None, testbed_prompts=False, panel=True)
  with pytest.raises(errors.ConfigError, match=r"--judge='no\.such\.module:fn'"):
    canary.check_judge("no.such.module:fn", testbed_prompts=True)
  with pytest.raises(errors.ConfigError, match="expected gold, rm:DIR"):
    canary.check_judge("golden", testbed_prompts=True)
  with pytest.raises(errors.ConfigError, match="a canary has no proxy"):
    canary.check_judge("proxy", testbed_prompts=True)
  with pytest.raises(errors.StageError, match="no such directory"):
    canary.check_judge("rm:/no/such/dir", testbed_prompts=True)


def test_stage_checks_name_the_flag(tmp_path):
  with pytest.raises(errors.StageError, match=r"--baseline='/no/such': no such directory"):
    canary.check_stage("/no/such", "policy", "--baseline")
  with pytest.raises(errors.StageError, match=r"--candidate=.*holds no finished stage"):
    canary.check_stage(str(tmp_path), "policy", "--candidate")
  with pytest.raises(errors.StageError, match=r"--reward_model=.*not a reward"):
    canary.check_stage(LLAMA, "reward", "--reward_model")
  canary.check_stage(LLAMA, "policy", "--baseline")


def test_prompt_files_are_read_checked_and_capped(tmp_path):
  from rlhf_jax.hf.tokenizer import HfTokenizer

  tok = HfTokenizer(os.path.join(HF, "llama"))
  good = tmp_path / "good.jsonl"
  good.write_text("".join(json.dumps({"prompt": f"Review of item {i}:"}) + "\n" for i in range(5)))
  assert canary.read_prompts(str(good), tok, 18, num_prompts=3) == [
    f"Review of item {i}:" for i in range(3)
  ]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
  with pytest.raises(errors.DataError, match=r"bad\.jsonl:2"):
    canary.read_prompts(str(bad), tok, 18)
  with pytest.raises(errors.DataError, match="no such file"):
    canary.read_prompts(str(tmp_path / "missing.jsonl"), tok, 18)


def _other_tokenizer(folder) -> str:
  """hf:DIR of the llama fixture with two vocabulary entries swapped: another tokenizer."""
  shutil.copytree(os.path.join(HF, "llama"), folder)
  path = os.path.join(folder, "tokenizer.json")
  with open(path) as f:
    tok = json.load(f)
  vocab = tok["model"]["vocab"]
  a, b = sorted(vocab, key=vocab.get)[-2:]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  with open(path, "w") as f:
    json.dump(tok, f)
  return f"hf:{folder}"


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def mesh():
  from rlhf_jax import sharding

  return sharding.make_mesh((1, -1, 1))


def test_a_policy_against_itself_is_identical_and_unresolved(mesh):
  from rlhf_jax.data import testbed

  prompts = testbed.prompts("eval", 8, 0)
  report = canary.compare(
    LLAMA, LLAMA, prompts, mesh=mesh, testbed_prompts=True, panel=True, max_new_tokens=8
  )
  # The same policy with the same seed writes the same responses.
  assert [s["candidate"] for s in report["samples"]] == [s["baseline"] for s in report["samples"]]
  assert report["kl"]["candidate_vs_baseline"] == pytest.approx(0.0, abs=1e-5)
  assert report["kl"]["baseline_vs_candidate"] == pytest.approx(0.0, abs=1e-5)
  assert report["drift"]["token_jsd"] == 0.0
  assert report["length"]["relative_change"] == 0.0
  assert report["primary"] == "judge" and report["judges"]["judge"]["name"] == "gold"
  for key in ("judge", "panel"):
    judged = report["judges"][key]
    assert (judged["win_rate"], judged["low"], judged["high"]) == (0.5, 0.5, 0.5)
  assert report["judges"]["panel"]["ties"] == 1.0
  assert report["verdict"] == canary.HOLD
  assert "not resolved" in report["reasons"][0]
  assert canary.markdown(report).endswith("\nverdict: hold\n")


def test_policies_with_different_tokenizers_are_refused(mesh, tmp_path):
  other = _other_tokenizer(str(tmp_path / "other"))
  with pytest.raises(errors.ConfigError, match="its tokenizer differs from --baseline"):
    canary.compare(LLAMA, other, ["Review of the blue kettle:"], mesh=mesh, judge=None)


# ----------------------------------------------------------------------------- command line


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  return env


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """Each command line's result (returncode, stdout, stderr) and the folder they share."""
  root = tmp_path_factory.mktemp("canary_cli")
  (root / "unfinished").mkdir()
  (root / "bad.jsonl").write_text('{"prompt": "Review of the lamp:"}\n[1, 2]\n')
  (root / "good.jsonl").write_text('{"prompt": "Review of the lamp:"}\n')
  other = _other_tokenizer(str(root / "other"))
  cases = {
    "unfinished": ["--baseline={root}/unfinished", f"--candidate={LLAMA}"],
    "malformed_prompts": [f"--baseline={LLAMA}", f"--candidate={GPT2}",
                          "--prompts={root}/bad.jsonl"],
    "gold_off_testbed": [f"--baseline={LLAMA}", f"--candidate={GPT2}",
                         "--prompts={root}/good.jsonl", "--judge=gold"],
    "tokenizers_differ": [f"--baseline={LLAMA}", f"--candidate={other}"],
    "good": [f"--baseline={LLAMA}", f"--candidate={GPT2}", "--num_prompts=8",
             "--max_new_tokens=8", "--panel", "--out={root}/out"],
  }  # fmt: skip
  jobs = [
    cli_runner.Job("experiments.canary", tuple(a.format(root=root) for a in args))
    for args in cases.values()
  ]
  done = cli_runner.run_many(
    jobs, cwd=REPO, env=_env(), scratch=str(root / "runner"), parallel=2, timeout=300
  )
  results = {name: (d.returncode, d.stdout, d.stderr) for name, d in zip(cases, done, strict=True)}
  return results, root


def _fatal_lines(stderr):
  assert "Traceback" not in stderr, stderr
  return [line for line in stderr.splitlines() if line.startswith("FATAL")]


def test_a_missing_baseline_is_one_fatal_line(tmp_path):
  """The real `python -m` entry point, cold."""
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.canary", f"--baseline={tmp_path}/missing",
     f"--candidate={LLAMA}", f"--out={tmp_path}/out"],
    cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == errors.EXIT_CODE, proc.stderr
  assert _fatal_lines(proc.stderr) == [
    f"FATAL stage error: --baseline='{tmp_path}/missing': no such directory"
  ]
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
  "case, fragments",
  [
    ("unfinished", ["FATAL stage error: --baseline=", "holds no finished stage"]),
    ("malformed_prompts", ["FATAL data error: ", "bad.jsonl:2"]),
    ("gold_off_testbed", ["FATAL config error: --judge=gold"]),
    ("tokenizers_differ", ["FATAL config error: --candidate=", "tokenizer differs"]),
  ],
)
def test_bad_input_is_one_fatal_line_and_exit_2(cli, case, fragments):
  results, _ = cli
  returncode, _, stderr = results[case]
  assert returncode == errors.EXIT_CODE, stderr[-2000:]
  fatal = _fatal_lines(stderr)
  assert len(fatal) == 1, stderr[-2000:]
  for fragment in fragments:
    assert fragment in fatal[0]


def test_a_good_run_writes_the_report_and_ends_with_the_verdict(cli):
  results, root = cli
  returncode, stdout, stderr = results["good"]
  assert returncode == 0, stderr[-3000:]
  last = stdout.strip().splitlines()[-1]
  assert last in {f"verdict: {v}" for v in canary.VERDICTS}
  with open(root / "out" / "canary.json") as f:
    report = json.load(f)
  assert last == f"verdict: {report['verdict']}"
  assert report["reasons"] and report["primary"] == "judge"
  assert report["judges"]["judge"]["name"] == "gold" and "panel" in report["judges"]
  assert report["kl"]["candidate_vs_baseline"] > 0  # two different models
  assert report["prompts"] == {"num": 8, "testbed": True, "file": None, "seed": 0}
  markdown = (root / "out" / "canary.md").read_text()
  assert markdown.startswith("# Canary") and markdown.endswith(f"\n{last}\n")
  assert "## Judges" in markdown and "# Canary" in stdout
  with open(root / "out" / "samples.jsonl") as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 8 and {"prompt", "baseline", "candidate", "judge_candidate"} <= set(
    samples[0]
  )
