"""The shipped built-in model: its files match their digests (a damaged copy is refused), and it
answers document questions in the contract format by greedy decoding in one process, copying
names and values it never saw in training from the documents."""

import shutil

import pytest

from builtin_qa import QA_PARAMS, QA_PROMPTS, QA_REPLIES
from raymoe.engine.llm import LLM
from raymoe.errors import CheckpointError
from raymoe.model import builtin


def test_the_shipped_files_match_their_digests(tmp_path):
    assert set(builtin.SHIPPED_SHA256) == set(builtin.FILES)
    folder = builtin.builtin_model_path()
    assert folder.name == builtin.PACKAGE_FOLDER and folder != builtin.random_model_path()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    builtin.check_sha256(copy, builtin.SHIPPED_SHA256)  # an intact copy passes
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors has SHA-256"):
        builtin.check_sha256(copy, builtin.SHIPPED_SHA256)
    shutil.copyfile(folder / "model.safetensors", copy / "model.safetensors")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        builtin.check_sha256(copy, builtin.SHIPPED_SHA256)


def test_answers_document_questions_in_one_process():
    replies = [o.text for o in LLM().generate(QA_PROMPTS, QA_PARAMS)]
    assert replies == QA_REPLIES
