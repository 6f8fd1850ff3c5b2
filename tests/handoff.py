"""In-process prefill → decode hand-off for engine tests: the KV connector without Ray."""

from __future__ import annotations

import pickle

from engine.engine import LLMEngine


def prefill_then_decode(prefill: LLMEngine, decode: LLMEngine, requests: dict[str, tuple[list[int], object]],
                        pickled: bool = True, payloads: list | None = None) -> dict[str, list[int]]:
    """Prefill every request, move each one's payload (through pickle: what any transport does) into
    the decode engine, decode to the end. Returns each request's generated tokens (from decode alone);
    the payloads are appended to ``payloads`` when given."""
    for rid, (prompt, params) in requests.items():
        prefill.add_request(rid, prompt, params)
    while prefill.has_unfinished():
        prefill.step()
    for rid in requests:
        payload = prefill.export_kv(rid)
        if pickled:
            payload = pickle.loads(pickle.dumps(payload))
        if payloads is not None:
            payloads.append(payload)
        c = payload.control
        decode.add_request(rid, c.prompt_token_ids, c.params, kv=payload)
    got: dict[str, list[int]] = {}
    while decode.has_unfinished():
        for out in decode.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return got
