"""The `moelora` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moelora.cli import build_parser, main


def test_forward_on_demo_prints_top_tokens(capsys):
    argv = ["forward", "demo", "--prompt", "Hello", "--prompt", "The weather", "--top", "3"]
    assert main([*argv, "--no-demo-adapters"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt: ") == 2
    probs = [float(line.split()[0]) for line in out.splitlines() if line.startswith("  ")]
    assert len(probs) == 6 and all(0 < p <= 1 for p in probs)
    assert probs[:3] == sorted(probs[:3], reverse=True)
    # With the demo adapters, each prompt also runs on each adapter, and the adapters change the answer.
    assert main([*argv, "--use", "base", "--use", "fused-r16"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt: ") == 4 and out.count("adapter: fused-r16") == 2
    blocks = out.split("prompt: ")[1:]
    assert blocks[0].split("\n", 1)[1] != blocks[1].split("\n", 1)[1]


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    assert main(["forward", str(tmp_path / "absent"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_flags_come_from_config_fields():
    args = build_parser().parse_args(["forward", "--dtype", "bfloat16", "--no-progress", "--seed", "3"])
    assert (args.model, args.dtype, args.progress, args.seed) == ("demo", "bfloat16", False, 3)


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "moelora.cli", "forward", "--no-progress", "--prompt", "Hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "prompt: 'Hi'" in result.stdout


def test_generate_on_demo(capsys):
    argv = ["generate", "--no-progress", "--prompt", "Hello", "--temperature", "0", "--max-tokens", "5"]
    assert main([*argv, "--logprobs", "1"]) == 0
    out = capsys.readouterr().out
    # One mixed batch: the prompt on the base model and on each demo adapter.
    for name in ("base model", "expert-r8", "fused-r16", "partial-r4"):
        assert f"adapter: {name}" in out
    assert out.count("completion (length, 5 tokens)") == 4 and out.count(" <- {") == 20


def test_generate_with_fp8_experts(capsys):
    """vLLM's `--quantization fp8` (and `-q`): the demo's experts in FP8, its adapters on them; an unknown
    method is refused by the flag's choices."""
    argv = ["generate", "--no-progress", "--prompt", "Hello", "--max-tokens", "3", "--quantization", "fp8"]
    assert main(argv) == 0
    assert capsys.readouterr().out.count("completion (length, 3 tokens)") == 4
    with pytest.raises(SystemExit):
        main(["generate", "--no-progress", "-q", "awq"])
    assert "invalid choice: 'awq'" in capsys.readouterr().err


def test_generate_with_chosen_adapters(capsys):
    from moelora.demo import demo_adapter_paths

    path = demo_adapter_paths()["partial-r4"]
    argv = ["generate", "--no-progress", "--max-tokens", "3", "--lora", f"mine={path}", "--use", "mine"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("adapter: ") == 1 and "adapter: mine" in out
    assert main(["generate", "--no-progress", "--lora", "oops"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_generate_flags_from_dataclasses():
    args = build_parser().parse_args(
        ["generate", "m", "--tp", "2", "--ep", "1", "--num-kv-blocks", "9", "--stop", "a", "--stop", "b"]
    )
    assert (args.model, args.tp_size, args.ep_size, args.num_kv_blocks) == ("m", 2, 1, 9)
    assert args.sp_stop == ["a", "b"] and args.max_model_len is None


def test_generate_bad_sampling_is_a_clear_error(capsys):
    assert main(["generate", "--no-progress", "--temperature", "-2"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_serve_flags_from_dataclasses():
    argv = ["serve", "--port", "9", "--api-key", "k", "--lora-dir", "/tmp", "--max-waiting", "3", "--tp", "2"]
    args = build_parser().parse_args([*argv, "--served-model-name", "x", "--lora", "a=b"])
    assert (args.model, args.port, args.api_key, args.lora_dir, args.max_waiting) == (
        "demo",
        9,
        "k",
        "/tmp",
        3,
    )
    assert (args.served_model_name, args.tp_size, args.lora, args.host) == ("x", 2, ["a=b"], "127.0.0.1")


def test_serve_bad_settings_are_clear_errors(capsys, tmp_path):
    assert main(["serve", "--no-progress", "--lora-dir", str(tmp_path / "absent")]) == 2
    assert "lora_dir" in capsys.readouterr().err
    assert main(["serve", "--no-progress", "--served-model-name", "a:b"]) == 2
    assert "':'" in capsys.readouterr().err


def test_engine_and_cli_do_not_import_the_server_stack():
    code = "import sys, moelora.cli, moelora.llm; print(sorted({'fastapi', 'uvicorn'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
