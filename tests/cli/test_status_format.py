"""`raymoe status` text from an /admin/cluster document."""

from raymoe.client.status import format_status

DOC = {
    "backend": "cluster", "model": "/m", "placement_epoch": 3,
    "nodes": [{"node_id": "aaaaaaaaaaaaaaaa", "address": "127.0.0.1", "speed": 2.0}],
    "deployments": {"decode": {"status": "HEALTHY", "running": 2}},
    "workers": [{"kind": "decode", "node_id": "aaaaaaaaaaaaaaaa", "running": 5,
                 "speculative": {"method": "prompt_lookup", "num_verify_steps": 9, "acceptance_rate": 0.25,
                                 "mean_accepted_tokens": 1.75}}],
    "controller": {"shards": [{"name": "shard-0", "node_id": "aaaaaaaaaaaaaaaa", "num_physical": 64, "speed": 2.0}],
                   "events": [{"time": 90.0, "kind": "node_joined", "node_id": "bbbb"}],
                   "dispatch": {"aaaaaaaaaaaaaaaa": {"local_activation_rate": 0.5, "rows_crossing_process_per_token": 4.0,
                                                     "rows_crossing_node_per_token": 2.0}}},
    "scaling": {"decode": [{"time": 95.0, "deployment": "decode", "from": 1, "to": 2,
                            "reason": "running_sequences 9 over 1 replica(s), target 4 per replica -> 3"}]},
}  # fmt: skip


def test_every_section_is_shown_with_its_reason():
    text = format_status(DOC, now=100.0)
    assert "placement epoch: 3" in text
    assert "aaaaaaaaaaaa  127.0.0.1  speed 2" in text
    assert "decode   HEALTHY  running 2" in text
    assert "shard-0" in text and "experts 64" in text
    assert "5s ago  decode: 1 -> 2  (running_sequences 9" in text
    assert "10s ago  node_joined  node_id=bbbb" in text
    assert "aaaaaaaaaaaa  local activation 0.500  crossing process 4.000  crossing node 2.000" in text
    assert "running 5  prompt_lookup: acceptance 0.25, 1.75 tokens/step" in text


def test_engine_backend_document_has_no_cluster_sections():
    text = format_status({"backend": "engine", "model": "/m", "nodes": [], "workers": []}, now=0.0)
    assert "expert shards" not in text and "scaling" not in text


def test_engine_backend_says_what_runs():
    doc = {"backend": "engine", "model": "raymoe-builtin-moe", "model_path": "/cache/builtin-v1", "placement_epoch": None,
           "nodes": [{"node_id": "aaaaaaaaaaaaaaaa", "address": "127.0.0.1", "speed": 1.0}],
           "workers": [{"kind": "engine", "node_id": "aaaaaaaaaaaaaaaa", "num_running": 2, "num_finished": 17,
                        "num_rejected": 0, "num_generated_tokens": 300}]}  # fmt: skip
    text = format_status(doc, now=0.0)
    assert "model: raymoe-builtin-moe" in text and "model path: /cache/builtin-v1" in text
    assert "placement epoch: None" not in text and "placement: none" in text
    assert "engine   node aaaaaaaaaaaa  running 2  finished 17" in text and "prompts" not in text
