"""The te-llama command: the README's commands, the demo, convert, and errors with exit codes."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from te_llama.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n +(.+)\n", text)
    assert match, marker
    return match.group(1)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci
    assert readme_command("test-command").endswith("python -m pytest -q")
    # both commands set up the same way and differ only in what they run
    assert readme_command("main-command").endswith("te-llama finetune")


def console_script() -> list[str]:
    executable = shutil.which("te-llama")
    return [executable] if executable else [sys.executable, "-m", "te_llama"]


def test_readme_main_job_through_the_console_script(tmp_path):
    """The README's main job, `te-llama finetune` on the embedded defaults, shortened with documented flags."""
    command = readme_command("main-command").rsplit("&& ", 1)[-1].split()
    assert command == ["te-llama", "finetune"]
    result = subprocess.run(console_script() + command[1:] + [
        "--output", str(tmp_path / "run"), "--max-steps", "2", "--max-eval-blocks", "2", "--batch-tokens", "512"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert "SmolLM2" in summary["model"] and summary["eval_perplexity_after"] > 1
    assert "reference layer, FP8 off" in result.stdout
    assert LlamaForCausalLM.from_pretrained(tmp_path / "run").config.num_key_value_heads == 3


def test_demo_through_the_console_script(tmp_path):
    command = console_script()
    result = subprocess.run(command + ["demo", "--output", str(tmp_path / "demo"), "--eval-tokens", "128",
                                       "--max-new-tokens", "12"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["round_trip_bit_identical"] and summary["greedy_tokens_identical"]
    assert summary["parity"]["relative_error"] < 1e-5
    assert "perplexity: transformers" in result.stdout and "reference" in result.stdout
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "demo" / "checkpoint")
    assert reloaded.config.num_key_value_heads == 3


def test_convert(tmp_path, hf_checkpoint, capsys):
    directory, _ = hf_checkpoint()
    assert main(["convert", "--model", str(directory), "--output", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out.split("saved")[0])
    assert report["max_abs_logit_diff"] < 1e-4
    assert LlamaForCausalLM.from_pretrained(tmp_path / "out").config.architectures == ["LlamaForCausalLM"]


def test_convert_refuses_an_existing_output_and_the_model_directory(tmp_path, hf_checkpoint, capsys):
    directory, _ = hf_checkpoint()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["convert", "--model", str(directory), "--output", str(existing)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (existing / "keep.txt").is_file()
    assert main(["convert", "--model", str(directory), "--output", str(directory), "--overwrite"]) == 2
    assert "is the --model directory" in capsys.readouterr().err
    assert main(["convert", "--model", str(directory), "--output", str(existing), "--overwrite"]) == 0
    assert LlamaForCausalLM.from_pretrained(existing).config.architectures == ["LlamaForCausalLM"]


def test_convert_a_checkpoint_of_another_family(tmp_path, hf_checkpoint, capsys):
    from conftest import family_config

    directory, _ = hf_checkpoint(family_config("qwen3", head_dim=24))
    assert main(["convert", "--model", str(directory), "--output", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out.split("saved")[0])
    assert report["max_abs_logit_diff"] < 1e-4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_expected_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["convert", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a directory" in err and "Traceback" not in err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "convert" in out
