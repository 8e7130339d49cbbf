import subprocess
import sys

import pytest

from mmgen.config import ConfigError, load_config, validate


def test_overrides_apply_with_types(repo):
    cfg = load_config(str(repo / "configs/tiny.py"), ["--config.optim.lr=1e-3",
                                                      "--config.train.steps=7",
                                                      "--config.model.dtype=bfloat16"])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7 and cfg.model.dtype == "bfloat16"


def test_preset_arg(repo):
    assert load_config(str(repo / "configs/tiny.py") + ":smoke").train.steps == 10


def test_unknown_key_names_the_key_and_suggests(repo):
    match = r"unknown config key 'optim.lrr' \(did you mean optim.lr"
    with pytest.raises(ConfigError, match=match):
        load_config(str(repo / "configs/tiny.py"), ["--config.optim.lrr=1"])


def test_wrong_type_is_rejected(repo):
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(str(repo / "configs/tiny.py"), ["--config.train.steps=many"])


@pytest.mark.parametrize("override, devices, message", [
    ("model.num_kv_heads=3", 1, "num_kv_heads"),
    ("train.global_batch=6", 4, "does not divide over mesh"),
    ("train.grad_accum=5", 1, "not divisible by train.grad_accum"),
    ("mesh.tensor=3", 4, "mesh"),
    ("model.head_dim=12", 1, "head_dim"),
    ("eval.hook_suites=loss,vibes", 1, "unknown suites"),
    ("mesh.dcn.data=3", 4, "3 slices, which does not divide 4 devices"),
    ("mesh.dcn.fsdp=0", 4, "mesh.dcn sizes must be >= 1"),
    ("loss.ce_chunk=-1", 1, "loss.ce_chunk must be >= 0"),
    # real data reads round(global_batch x examples_per_row) examples a step: 0 trained
    # every step on padding alone (loss 0), and the run finished without a word
    # a key the source does not read: a forgotten data.source trained on synthetic data
    ("data.path=a/*.tar", 1, r"^data.path is set but data.source='synthetic' does not read "
     r"it \(set data.source to one of \('wds', "),
    ("data.aspect_buckets=1:1,16:9", 1, "data.aspect_buckets is set but data.source="),
    ("data.source=wds data.path=a.tar data.mixture=text:b.jsonl=1", 1,
     r"^data.mixture is set but data.source='wds' does not read it$"),
    ("data.source=mix data.mixture=text:b.jsonl=1 data.path=a.tar", 1,
     r"^data.path is set but data.source='mix' does not read it$"),
    ("data.source=text data.path=docs.jsonl data.examples_per_row=0.01", 1,
     "train.global_batch x data.examples_per_row = 0.08 rounds to 0 examples per step"),
])
def test_impossible_shapes_fail_before_compiling(repo, override, devices, message):
    cfg = load_config(str(repo / "configs/tiny.py"), override.split())
    with pytest.raises(ConfigError, match=message):
        validate(cfg, devices)


@pytest.mark.parametrize("config, override, hint", [
    # the hint named every real source: data.source=wds then refused the mixture, mix the
    # path, and the decoder any real source
    ("tiny.py", "data.mixture=text:b.jsonl=1", " (set data.source=mix)"),
    ("tiny.py", "data.path=a.tar", " (set data.source to one of ('wds', 'arrayrecord', "
     "'folder', 'text', 'interleaved'))"),
    ("decoder_tiny.py", "data.path=a.tar", ""),
])
def test_an_unread_data_key_hints_only_at_sources_that_read_it(repo, config, override, hint):
    cfg = load_config(str(repo / "configs" / config), [override])
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value) == f"{key} is set but data.source='synthetic' does not read it{hint}"


@pytest.mark.parametrize("config, override, message", [
    ("tiny.py", "train.global_batch=0", "train.global_batch must be >= 1, got 0"),
    ("tiny.py", "train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("tiny.py", "train.steps=-3", "train.steps must be >= 1, got -3"),
    ("tiny.py", "train.checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
    ("tiny.py", "optim.warmup_steps=-5", "optim.warmup_steps must be >= 0, got -5"),
    ("tiny.py", "optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1], got 1.5"),
    ("tiny.py", "optim.b2=1.0", "optim.b2 must be in [0, 1), got 1.0"),
    ("tiny.py", "optim.ema_decay=1.0", "optim.ema_decay must be in [0, 1), got 1.0"),
    ("tiny.py", "optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("tiny.py", "optim.eps=0.0", "optim.eps must be positive, got 0.0"),
    ("tiny.py", "model.num_kv_heads=0", "model.num_kv_heads must be >= 1, got 0"),
    ("tiny.py", "model.num_layers=0", "model.num_layers must be >= 1, got 0"),
    ("tokenizer_tiny.py", "train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("decoder_tiny.py", "optim.grad_clip=-1.0", "optim.grad_clip must be >= 0, got -1.0"),
    ("tiny.py", "data.caption_dropout=1.5", "data.caption_dropout must be in [0, 1], got 1.5"),
    ("tiny.py", "data.caption_task_fraction=-0.5",
     "data.caption_task_fraction must be in [0, 1], got -0.5"),
    ("tiny.py", "data.p_word=2.0", "data.p_word must be in [0, 1], got 2.0"),
    ("tiny.py", "data.max_objects=0", "data.max_objects must be in [1, 4], got 0"),
    ("tokenizer_tiny.py", "data.image_size=0", "data.image_size must be >= 8, got 0"),
    # the jsonl files of SFT and DPO read them beside the synthetic data source
    ("sft_edit.py", "data.max_bad_fraction=-0.1",
     "data.max_bad_fraction must be in [0, 1], got -0.1"),
    ("dpo.py", "data.max_pixels=0", "data.max_pixels must be >= 1, got 0"),
    ("tiny.py", "loss.z_loss=-1.0", "loss.z_loss must be >= 0, got -1.0"),
    ("tokenizer_tiny.py", "loss.code_snap=-0.1", "loss.code_snap must be >= 0, got -0.1"),
    ("tiny.py", "loss.modality_weights.text=-1.0",
     "loss.modality_weights must be >= 0 with one > 0, got {'image': 1.0, 'text': -1.0}"),
])
def test_out_of_range_numbers_fail_by_name(repo, config, override, message):
    """Each of these used to crash mid-run (a modulo by zero, grain's batcher) or run
    something meaningless; now validate names the key in one line."""
    cfg = load_config(str(repo / "configs" / config), [f"--config.{override}"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value) == message


@pytest.mark.parametrize("spec", ["tiny.py:smok", "tokenizer_tiny.py:fast",
                                  "tokenizer_256.py:smoke", "decoder_tiny.py:1gpu",
                                  "small.py:jiont", "dpo.py:x"])
def test_a_config_refuses_an_unknown_arg_in_one_line(repo, spec):
    """A mistyped `:ARG` used to train the full default config without a word (tiny,
    tokenizer_tiny, decoder_tiny) or end in a traceback (the others)."""
    with pytest.raises(ConfigError, match=r"unknown arg") as e:
        load_config(str(repo / "configs" / spec))
    assert "\n" not in str(e.value) and repr(spec.partition(":")[2]) in str(e.value)


@pytest.mark.parametrize("overrides, devices, platform, message", [
    (["model.attention_impl=pallas_gpu"], 1, "cpu",
     "model.attention_impl='pallas_gpu' supports model.head_dim in (64, 128, 256), got 32"),
    (["model.attention_impl=cudnn", "model.head_dim=64", "model.num_heads=2",
      "model.num_kv_heads=1"], 1, "gpu",
     "model.attention_impl='cudnn' needs model.dtype='bfloat16', got 'float32'"),
    (["model.attention_impl=pallas_mgpu", "model.head_dim=64", "model.num_heads=2",
      "model.num_kv_heads=1", "model.dtype=bfloat16"], 1, "cpu",
     "model.attention_impl='pallas_mgpu' runs on NVIDIA GPUs, not on 'cpu'"),
    (["model.attention_impl=pallas_tpu", "mesh.data=1", "mesh.sequence=2"], 2, "cpu",
     "model.attention_impl='pallas_tpu' runs interpreted on CPU, which does not work with "
     "mesh.sequence=2: use attention_impl 'xla' or 'auto'"),
    (["model.rope_theta=0.0"], 1, "cpu", "model.rope_theta must be positive, got 0.0"),
])
def test_an_attention_kernel_that_cannot_run_here_fails_by_name(repo, overrides, devices,
                                                                platform, message):
    """Each used to compile and then end in a raw traceback at step 1 (or, for the
    interpreted kernels under a sequence-split mesh, hang; rope_theta 0: NaN losses)."""
    cfg = load_config(str(repo / "configs/tiny.py"), [f"--config.{o}" for o in overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg, devices, platform=platform)
    assert str(e.value) == message


def test_dcn_multiplies_the_per_slice_axes(repo):
    from mmgen.parallel.mesh import resolve_axis_sizes

    sizes = resolve_axis_sizes({"data": -1, "fsdp": 2, "dcn": {"data": 2, "fsdp": 1}}, 16)
    assert sizes == {"data": 8, "fsdp": 2, "sequence": 1, "tensor": 1}  # 4 per slice x 2


def test_cli_prints_one_line_error(repo, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mmgen.cli", "train", "--config", "configs/tiny.py",
         "--config.optim.lrr=1", "--workdir", str(tmp_path)],
        cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if "mmgen train" in ln]
    assert lines == ["mmgen train: error: unknown config key 'optim.lrr' (did you mean optim.lr?)"]


def test_multi_process_environment_errors_are_one_line(monkeypatch):
    from mmgen.parallel.distributed import initialize_from_env

    monkeypatch.delenv("MMGEN_COORDINATOR", raising=False)
    monkeypatch.delenv("MMGEN_DISTRIBUTED", raising=False)
    assert initialize_from_env() is False  # single process
    monkeypatch.setenv("MMGEN_DISTRIBUTED", "bogus")
    with pytest.raises(ConfigError, match="use auto or off"):
        initialize_from_env()
    monkeypatch.delenv("MMGEN_DISTRIBUTED")
    monkeypatch.setenv("MMGEN_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("MMGEN_NUM_PROCESSES", "2")
    monkeypatch.setenv("MMGEN_PROCESS_ID", "5")
    with pytest.raises(ConfigError, match=r"MMGEN_PROCESS_ID=5 is not in \[0, 2\)"):
        initialize_from_env()
    monkeypatch.setenv("MMGEN_PROCESS_ID", "one")
    with pytest.raises(ConfigError, match="must be integers"):
        initialize_from_env()


def test_tokenizer_encoder_is_checked(repo):
    cfg = load_config(str(repo / "configs/tokenizer_tiny.py"), ["--config.model.encoder=vit"])
    with pytest.raises(ConfigError, match="model.encoder must be 'conv' or 'patch'"):
        validate(cfg, 1)


@pytest.mark.parametrize("override, message", [
    # a modulo by zero, an FSQ error and a division by zero, each with a traceback
    ("model.downsample=0", "model.downsample=0 must be a power of 2"),
    ("model.levels=()", "model.levels must be one or more whole numbers >= 2, got ()"),
    ("model.channels=0", "model.channels must be >= 1, got 0"),
    # trained without a word: a code count that is no integer, or no residual blocks
    ("model.levels=(8, 5.5)",
     "model.levels must be one or more whole numbers >= 2, got (8, 5.5)"),
    ("model.num_res_blocks=-1", "model.num_res_blocks must be >= 0, got -1"),
])
def test_tokenizer_model_keys_fail_by_name(repo, override, message):
    cfg = load_config(str(repo / "configs/tokenizer_tiny.py"), [f"--config.{override}"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value) == message


@pytest.mark.parametrize("name, text, message", [
    ("syntax.py", "def get_config(:\n", r"syntax.py:1: syntax error"),
    ("notes.md", "# not a config\n", r"notes.md is not a config: configs are Python files"),
    ("typo_kind.py", "from ml_collections import ConfigDict\n"
     "def get_config(arg=None):\n    return ConfigDict(dict(kind='jont'))\n",
     r"kind must be one of \['tokenizer', 'joint', 'decoder'\], got 'jont'"),
    ("no_groups.py", "from ml_collections import ConfigDict\n"
     "def get_config(arg=None):\n    return ConfigDict(dict(kind='joint', model={}))\n",
     r"a joint config needs the groups \['data', 'loss'"),
])
def test_a_broken_config_file_fails_in_one_line(tmp_path, name, text, message):
    """These used to end in tracebacks (SyntaxError, 'NoneType' has no 'loader', an
    AttributeError from the first group code read before validate)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(str(path))
    assert "\n" not in str(e.value)


def test_kind_cannot_be_overridden(repo):
    """--config.kind=tokenizer on a joint config used to fail deep in the tokenizer code."""
    with pytest.raises(ConfigError, match="config key 'kind' cannot be overridden"):
        load_config(str(repo / "configs/tiny.py"), ["--config.kind=tokenizer"])


def test_a_relative_config_path_falls_back_to_the_repository(repo, tmp_path, monkeypatch):
    """`mmgen train --config configs/tiny.py` (or import-llama's default base config) from
    outside the repository used to fail with 'config file not found'. The working
    directory's own configs/ still comes first."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny.py:smoke").kind == "joint"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text(
        "from ml_collections import ConfigDict\n"
        "def get_config(arg=None):\n    return ConfigDict(dict(kind='mine'))\n")
    with pytest.raises(ConfigError, match="got 'mine'"):
        load_config("configs/tiny.py")
    with pytest.raises(ConfigError, match=f"not found: configs/nope.py \\(nor in {repo}\\)"):
        load_config("configs/nope.py")
