"""Distillation (builders/distill.py): the student's initialisation, the loss, training that lowers
it and resumes from a checkpoint to the same losses, `fastserve distill` end to end into a folder
the builder and engine take, and bad requests refused before the teacher loads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from builders import distill
from tests.conftest import build_entry, tiny_config

TEXT = (
    "The river runs past the mill and under the old stone bridge. Children throw sticks from one side "
    "and run to the other to see which comes out first. In winter the water freezes at the edges. "
) * 12


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, smollm2_source):
    """A random four-layer Llama with SmolLM2's tokenizer."""
    tokenizer = smollm2_source[1]
    cfg = tiny_config("llama", len(tokenizer))
    cfg.num_hidden_layers = 4
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("distill") / "teacher"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_student_layers_are_spread_over_the_teacher():
    assert distill.layer_subset(30, 15)[0] == 0 and distill.layer_subset(30, 15)[-1] == 29
    assert distill.layer_subset(4, 2) == [0, 3] and distill.layer_subset(4, 1) == [0]
    assert distill.layer_subset(4, 4) == [0, 1, 2, 3]
    with pytest.raises(distill.DistillError, match="larger than its teacher"):
        distill.layer_subset(4, 5)


def test_the_student_starts_as_the_chosen_teacher_layers(teacher_folder):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32)
    student = distill.make_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    for mine, theirs in ((0, 0), (1, 3)):
        a, b = student.model.layers[mine].mlp.up_proj.weight, teacher.model.layers[theirs].mlp.up_proj.weight
        assert torch.equal(a, b)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_the_loss_mixes_the_hard_and_the_soft_terms():
    torch.manual_seed(0)
    s, t, labels = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce = F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1))
    loss, hard, soft = distill.distill_loss(s, t, labels, alpha=1.0, t=2.0)
    assert loss == pytest.approx(float(ce)) and hard == pytest.approx(float(ce))
    kl = F.kl_div(F.log_softmax(s / 2, -1).reshape(-1, 11), F.softmax(t / 2, -1).reshape(-1, 11), reduction="batchmean")
    assert soft == pytest.approx(4 * float(kl), rel=1e-5)
    loss, _, soft = distill.distill_loss(t, t, labels, alpha=0.0, t=2.0)
    assert abs(soft) < 1e-6 and abs(float(loss)) < 1e-6


def test_training_lowers_the_loss_and_resumes_to_the_same_losses(teacher_folder, tmp_path, smollm2_source):
    ids = distill.text_ids(smollm2_source[1], _text(tmp_path))
    opts = distill.TrainOptions(steps=6, batch_size=2, seq_len=32, lr=3e-3, checkpoint_every=2)

    def fresh():
        teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32)
        return teacher, distill.make_student(teacher, [0, 3])

    teacher, student = fresh()
    whole = distill.train(student, teacher, ids, opts, checkpoint=tmp_path / "a", progress=False)
    assert [h.step for h in whole] == list(range(1, 7))
    assert whole[-1].loss < whole[0].loss

    class Stop(Exception):
        pass

    def crash_at_3(record):
        if record.step == 3:
            raise Stop

    teacher, student = fresh()
    with pytest.raises(Stop):
        distill.train(student, teacher, ids, opts, checkpoint=tmp_path / "b", on_step=crash_at_3, progress=False)
    saved = json.loads((tmp_path / "b" / "progress.json").read_text())
    assert saved["step"] == 2  # the last checkpoint before the crash
    teacher, student = fresh()
    resumed = distill.train(student, teacher, ids, opts, checkpoint=tmp_path / "b", progress=False)
    assert [h.step for h in resumed] == list(range(1, 7))
    assert [h.loss for h in resumed] == pytest.approx([h.loss for h in whole], rel=1e-5)


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_fastserve_distill_makes_a_student_the_engine_serves(teacher_folder, tmp_path):
    from fastserve.cli import main
    from python_backend.engine.engine import Engine, EngineConfig
    from python_backend.engine.sequence import SamplingParams

    out = tmp_path / "student"
    args = ["distill", "--teacher", str(teacher_folder), "--text", str(_text(tmp_path)), "--out", str(out)]
    args += ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--checkpoint-every", "2"]
    assert main(args) == 0
    record = json.loads((out / "distill.json").read_text())
    assert record["layers"] == [0, 3] and record["final_loss"] < record["first_loss"]
    assert not (out / distill.CHECKPOINT).exists()
    entry = build_entry(tmp_path / "repo", str(out), "student")
    engine = Engine(entry / "1" / "engine", EngineConfig(device="cpu", kv_cache_gb=0.05))
    try:
        out_seq = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    finally:
        engine.shutdown()
    assert len(out_seq.token_ids) == 4


def test_bad_requests_are_refused_before_the_teacher_loads(teacher_folder, tmp_path, capsys):
    from fastserve.cli import main

    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    out = tmp_path / "never"
    base = ["distill", "--teacher", str(teacher_folder), "--out", str(out)]
    assert main([*base, "--text", str(short)]) == 2
    assert "fewer than one batch needs" in capsys.readouterr().err
    assert main([*base, "--text", str(_text(tmp_path)), "--student-layers", "6", "--seq-len", "32"]) == 2
    assert "larger than its teacher" in capsys.readouterr().err
    assert main([*base, "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read the text file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--text", str(_text(tmp_path)), "--device", "cuda"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
    assert not out.exists()
