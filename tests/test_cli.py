from ospo_fast.cli import main


def test_env_lists_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "cpp_ops", "triton", "cuda", "flash_attn"):
        assert key in out


def test_config_error_exit_code(capsys):
    assert main(["config", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err
