"""Closed-form refinement at the real text encoder: mace.refine against the original MACE code's algorithm.

    python benchmarks/bench_refine_vs_original.py                 # 10 and 100 concepts, builtin:sd14-shapes
    python benchmarks/bench_refine_vs_original.py --smoke         # builtin:tiny, 2 concepts, to check the script

The model is ``builtin:sd14-shapes`` (SD 1.4's architecture, random weights): its 12-layer,
768-wide CLIP text encoder and the 32 cross-attention to_k/to_v projections. Only those are
loaded: the rest of the UNet is built on the meta device (no memory) and the projections are
read from the saved UNet, so the measurements are the refinement's, not the 3.4 GB UNet's.

Concepts are "concept 0", "concept 1", ... mapped to "a person", 30 prompt pairs each from the
project's templates (mace.concept_prompt_pairs). Settings are the original's 100-celebrity
config: lamb 0, train_preserve_scale 1e-4, a domain preservation cache (here the statistic of
64 prompts naming 64 other made-up people) with preserve_weight 2e5, no prior (COCO) cache,
max_memory 1000. With the concepts under max_memory the original scales the caches by
train_preserve_scale and its solve scales them again, so both methods solve with
s = train_preserve_scale ** 2 on P = preserve_weight * C_domain.

Methods, each cell a fresh process (time: wall seconds of the refinement; memory: peak RSS
above the process's RSS with the encoder, the projections and the caches loaded and warmed up,
the kernel's peak mark reset there):

- ``project``: mace.refine (fast method, float64 statistics, the erase stage's call). Each
  distinct prompt is encoded once, in batches of 64.
- ``original``: ``original_refinement`` below, a re-statement of the original code's stage 1
  (its prepare_k_v and closed_form_refinement). Each concept's 30 old and 30 new prompts are
  encoded in one batch per concept, so the 30 mapping prompts are encoded once per concept.
- ``original-precomputed`` (with ``--precomputed``): the same with the text encoder replaced by
  a look-up of the embeddings the project's run recorded: the original's algorithm without
  any encoding. Without it, the original's encoding time is measured inside its run.

``reference`` (not timed) solves the same normal equations exactly (float64 statistics,
float64 solve) from the recorded embeddings and measures every method's error against it.
The original at 100 concepts would hold every token's projection through all 32 layers
(about 23 GB here) and encode 6,000 prompts; it is not run (``--original-max``): its time and
memory are the 10-concept run's scaled by 10 (everything it does but the 32 d x d inverses is
per concept), and its error is that of the original's float32 arithmetic (float32 sums,
float32 torch.inverse) applied to the 100-concept statistics, an emulation checked against the
real re-statement at 10 concepts.

Prints a table and writes JSON to benchmarks/results/refine_vs_original-sd14-cpu-<N>cores.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from _results import RESULTS
from bench_closed_form import _reset_peak, _rss_mb

from mace.utils.atomic import write_json_atomically

LAMB = 0.0
TRAIN_PRESERVE_SCALE = 1e-4
PRESERVE_WEIGHT = 2e5
MAPPING = "a person"
PROMPTS_PER_CONCEPT = 30
PRESERVED_PROMPTS = 64


def effective_scale() -> float:
    """s of the solve: the original multiplies the caches by train_preserve_scale and passes it again."""
    return TRAIN_PRESERVE_SCALE**2


def concept_names(n: int) -> list[str]:
    return [f"concept {i}" for i in range(n)]


def concept_pairs(n: int, prompts: int = PROMPTS_PER_CONCEPT):
    """Per concept, its 30 (old, new) prompt pairs from the project's templates."""
    from mace import concept_prompt_pairs

    return [concept_prompt_pairs(c, MAPPING, "object", aug_length=prompts) for c in concept_names(n)]


def preserved_prompts() -> list[str]:
    from mace.stages.prompts import templates_for

    templates = templates_for("object")
    return [templates[k % len(templates)].format(f"keeper {k}") for k in range(PRESERVED_PROMPTS)]


# ----------------------------------------------------------------------------- the model


def load_model(name: str):
    """(tokenizer, text encoder, unet): the UNet on the meta device except its 32 cross-attention
    projections, real nn.Linear modules with the saved weights (what both methods read and edit)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch import nn
    from transformers import CLIPTextModel, CLIPTokenizer

    from mace.pipelines.components import cross_attention_projections, read_projection_weights
    from mace.pipelines.loading import resolve_model_path

    path = Path(resolve_model_path(name))
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
    names = [n for n, _ in cross_attention_projections(unet)]
    for n, w in zip(names, read_projection_weights(path, names), strict=True):
        parent, attr = n.rsplit(".", 1)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.float().contiguous()
        setattr(unet.get_submodule(parent), attr, linear)
    return tokenizer, encoder, unet


class Encoder:
    """The text encoder as both methods call it (``enc(ids)[0]``), timed; it may also record every
    output row to a file (``record``) or answer from recorded rows without running (``table``)."""

    def __init__(self, encoder, record=None, table=None):
        self.encoder, self.record, self.table = encoder, record, table
        self.seconds = self.record_seconds = 0.0
        self.calls = self.prompts = 0
        self.ids: list = []
        self.device = encoder.device

    def __call__(self, ids, **kwargs):
        import torch

        start = time.perf_counter()
        if self.table is not None:
            out = torch.stack([self.table[tuple(row)] for row in ids.tolist()])
        else:
            with torch.no_grad():
                out = self.encoder(ids, **kwargs)[0]
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.prompts += ids.shape[0]
        if self.record is not None:
            start = time.perf_counter()
            self.record.write(out.detach().float().contiguous().numpy().tobytes())
            self.ids.extend(tuple(r) for r in ids.tolist())
            self.record_seconds += time.perf_counter() - start
        return (out,)


def load_table(work: Path, n: int, prompts=None) -> dict:
    """Recorded (77, d) embeddings by padded token ids (only those of ``prompts`` when given)."""
    import numpy as np
    import torch

    meta = json.loads((work / f"emb-{n}.json").read_text())
    rows = np.fromfile(work / f"emb-{n}.bin", dtype=np.float32).reshape(len(meta["ids"]), *meta["shape"])
    wanted = None
    if prompts is not None:
        tok = prompts[0]
        wanted = {tuple(r) for r in tok(prompts[1], padding="max_length", max_length=tok.model_max_length,
                                        truncation=True).input_ids}
    return {tuple(ids): torch.from_numpy(rows[k].copy()) for k, ids in enumerate(meta["ids"])
            if wanted is None or tuple(ids) in wanted}


def encode_table(tokenizer, encoder, prompts) -> dict:
    """(77, d) embeddings of each distinct prompt by padded token ids, encoded once (as load_table's)."""
    import torch

    prompts = list(dict.fromkeys(prompts))
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        emb = encoder(ids)[0].float()
    return {tuple(r): e for r, e in zip(ids.tolist(), emb, strict=True)}


# ----------------------------------------------------------------------------- the original, re-stated


def original_alignment(old_ids, new_ids, length=77):
    """The original's token correspondence (find_matching_indices and the padding extension in
    prepare_k_v): common prefix and common suffix, then the padding after each prompt, the longer
    prompt's cut so both have as many positions."""
    prefix = 0
    while prefix < min(len(old_ids), len(new_ids)) and old_ids[prefix] == new_ids[prefix]:
        prefix += 1
    end_old, end_new = len(old_ids) - 1, len(new_ids) - 1
    while end_old >= prefix and end_new >= prefix and old_ids[end_old] == new_ids[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    old = list(range(prefix)) + list(range(end_old + 1, len(old_ids)))
    new = list(range(prefix)) + list(range(end_new + 1, len(new_ids)))
    if old[-1] >= new[-1]:
        return old + list(range(old[-1] + 1, length)), new + list(range(new[-1] + 1, length - (old[-1] - new[-1])))
    return old + list(range(old[-1] + 1, length - (new[-1] - old[-1]))), new + list(range(new[-1] + 1, length))


def domain_cache_layers(projections, C):
    """The original's cache file for a preserved statistic C (cache_coco.py's format): per layer
    '{l}_for_mat1' = W_l C and '{l}_for_mat2' = C, float32."""
    C = C.float()
    cache = {}
    for layer, proj in enumerate(projections):
        cache[f"{layer}_for_mat1"] = proj.weight.detach() @ C
        cache[f"{layer}_for_mat2"] = C
    return cache


def original_refinement(text_encoder, tokenizer, unet, concepts, domain_cache, *, lamb, train_preserve_scale,
                        preserve_weight, timings=None):
    """Re-states the original code's closed-form refinement as its training script runs it with the
    concepts under max_memory and all_words off (src/cfr_lora_training.py's stage 1 calling
    src/cfr_utils.py's prepare_k_v, then closed_form_refinement with the contexts and values).

    Per concept: every projection is restored from a deep copy of the unedited one, the concept's
    old and new prompts are encoded in one batch, and for every pair the aligned old tokens are
    kept together with the aligned new tokens projected through every one of the 32 layers.
    Then per layer: lamb W and lamb I, per concept a batched outer-product sum of values with
    contexts and of contexts with themselves, the scaled caches, and W' = mat1 @ inverse(mat2) in
    float32. The caches combine as the script does: train_preserve_scale * (prior + preserve_weight
    * domain) + the refinement's own (0 on this path), and the solve scales them by
    train_preserve_scale again. No prior cache here (prior = 0.0, as the script does without one).
    Projections are visited in the project's order (the original does all to_v, then all to_k):
    each layer's solve is independent, so the order changes nothing. ``timings["gc_seconds"]``
    gets the time of the gc.collect calls the original makes in both loops.
    """
    import torch

    from mace.pipelines.components import cross_attention_projections

    timings = {} if timings is None else timings
    timings["gc_seconds"] = 0.0

    def collect():
        start = time.perf_counter()
        gc.collect()
        timings["gc_seconds"] += time.perf_counter() - start

    slots = [(unet.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
             for name, _ in cross_attention_projections(unet)]
    og = [copy.deepcopy(getattr(m, a)) for m, a in slots]
    with torch.no_grad():
        # prepare_k_v
        all_contexts, all_values = [], []
        for pairs in concepts:
            collect()
            for (m, a), o in zip(slots, og, strict=True):
                setattr(m, a, copy.deepcopy(o))
            projections = [getattr(m, a) for m, a in slots]
            olds, news = [p.old for p in pairs], [p.new for p in pairs]
            ids = tokenizer(olds + news, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            emb = text_encoder(ids.to(text_encoder.device))[0]
            old_embs, new_embs = list(emb[:len(olds)]), list(emb[len(olds):])
            contexts, values = [], []
            for k, (o, nw) in enumerate(zip(olds, news, strict=True)):
                io, inew = original_alignment(tokenizer(o).input_ids, tokenizer(nw).input_ids)
                contexts.append(old_embs[k][io].detach())
                values.append([proj(new_embs[k][inew]).detach() for proj in projections])
            all_contexts.append(contexts)
            all_values.append(values)
        del og
        # the training script: caches combined, then closed_form_refinement
        cache = {key: train_preserve_scale * (0.0 + preserve_weight * value) + 0.0 for key, value in domain_cache.items()}
        projections = [getattr(m, a) for m, a in slots]
        for layer, proj in enumerate(projections):
            collect()
            W = proj.weight
            mat1 = lamb * W
            mat2 = lamb * torch.eye(W.shape[1], device=W.device)
            total1 = torch.zeros_like(W)
            total2 = torch.zeros_like(mat2)
            for contexts, values in zip(all_contexts, all_values, strict=True):
                ctx = torch.stack(contexts, dim=2)
                val = torch.stack([v[layer] for v in values], dim=2)
                total1 += torch.bmm(val, ctx.permute(0, 2, 1)).sum(dim=0)
                total2 += torch.bmm(ctx, ctx.permute(0, 2, 1)).sum(dim=0)
            total1 += train_preserve_scale * cache[f"{layer}_for_mat1"]
            total2 += train_preserve_scale * cache[f"{layer}_for_mat2"]
            total1 += mat1
            total2 += mat2
            proj.weight.data = total1 @ torch.inverse(total2)
            del total1, total2
    return sum(t.numel() * t.element_size() for c in all_contexts for t in c) + \
        sum(t.numel() * t.element_size() for vs in all_values for v in vs for t in v)


# ----------------------------------------------------------------------------- exact reference


def statistics(tokenizer, table, concepts):
    """Float64 (C_oo, C_no) over the aligned tokens, and the float32 sums the original forms."""
    import torch

    d = next(iter(table.values())).shape[-1]
    c_oo, c_no = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    f_oo, f_no = torch.zeros(d, d), torch.zeros(d, d)
    length = tokenizer.model_max_length
    for pairs in concepts:
        xs, ys = [], []
        for p in pairs:
            io, inew = original_alignment(tokenizer(p.old).input_ids, tokenizer(p.new).input_ids, length)
            pad = dict(padding="max_length", max_length=length, truncation=True)
            xs.append(table[tuple(tokenizer(p.old, **pad).input_ids)][io])
            ys.append(table[tuple(tokenizer(p.new, **pad).input_ids)][inew])
        x, y = torch.cat(xs), torch.cat(ys)
        c_oo += x.double().T @ x.double()
        c_no += y.double().T @ x.double()
        f_oo += x.T @ x
        f_no += y.T @ x
    return c_oo, c_no, f_oo, f_no


def exact_solution(weights, c_oo, c_no, P, lam, s):
    """W*_l = W_l (lam I + C_no + s P) (lam I + C_oo + s P)^-1 in float64, every layer."""
    import torch

    eye = torch.eye(c_oo.shape[0], dtype=torch.float64)
    M = lam * eye + c_oo + s * P
    R = lam * eye + c_no + s * P
    T = torch.linalg.solve(M, R.T).T  # M symmetric: T M = R
    evals = torch.linalg.eigvalsh(M)
    return [w.double() @ T for w in weights], float(evals[-1] / evals[0])


def original_arithmetic(weights, f_oo, f_no, P, lam, s):
    """The original's float32 solve from float32 sums (emulated: the sums in another order)."""
    import torch

    C = P.float()  # preserve_weight * C_domain
    eye = torch.eye(f_oo.shape[0])
    inv = torch.inverse(f_oo + s * C + lam * eye)
    return [(w @ f_no + s * (w @ C) + lam * w) @ inv for w in weights]


def errors(weights, exact, original, c_oo=None):
    """Relative Frobenius errors against the exact weights: of the weights, of the edit (W* - W0)
    and the worst layer's; with ``c_oo`` also of the outputs on the concepts' own old tokens,
    sqrt(sum_l tr(D_l C_oo D_l^T) / sum_l tr(W*_l C_oo W*_l^T)), D_l = W_l - W*_l: a weight error
    along directions the tokens barely span (an ill-conditioned C_oo's) hardly shows there."""
    import torch

    diff = sum(float(((w.double() - x) ** 2).sum()) for w, x in zip(weights, exact, strict=True))
    norm = sum(float((x**2).sum()) for x in exact)
    edit = sum(float(((x - o.double()) ** 2).sum()) for x, o in zip(exact, original, strict=True))
    worst = max(float(torch.linalg.norm(w.double() - x) / torch.linalg.norm(x)) for w, x in zip(weights, exact, strict=True))
    out = {"rel_error": (diff / norm) ** 0.5, "rel_error_of_edit": (diff / edit) ** 0.5, "max_layer_rel_error": worst}
    if c_oo is not None:
        num = sum(float(((w.double() - x) @ c_oo * (w.double() - x)).sum()) for w, x in zip(weights, exact, strict=True))
        den = sum(float((x @ c_oo * x).sum()) for x in exact)
        out["rel_output_error"] = (num / den) ** 0.5
    return out


# ----------------------------------------------------------------------------- one cell


def _measure(fn):
    """(result, seconds, peak MB above baseline, baseline MB, loads) of fn() in this process."""
    gc.collect()
    baseline = _rss_mb("VmRSS")
    exact = _reset_peak()
    load0 = os.getloadavg()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    load1 = os.getloadavg()
    peak = _rss_mb("VmHWM") if exact else None
    return result, seconds, {"peak_rss_mb": peak, "baseline_rss_mb": baseline,
                             "above_baseline_mb": None if peak is None or baseline is None else peak - baseline,
                             "load_average_start": list(load0), "load_average_end": list(load1)}


def run_one(method: str, n: int, work: Path, model: str, sub: int | None = None) -> dict:
    import torch

    import mace
    from mace.pipelines.components import cross_attention_projections, projection_weights, set_projection_weights

    tokenizer, encoder, unet = load_model(model)
    original_weights = [w.clone() for w in projection_weights(unet)]
    P = torch.load(work / "P.pt")
    s = effective_scale()
    if method == "prep":  # the preserved statistic, encoded once for every cell
        from mace.pipelines.components import encode_prompts

        pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder, unet=unet)
        emb = encode_prompts(pipe, preserved_prompts()).double()
        C = torch.einsum("btd,bte->de", emb, emb)
        torch.save(PRESERVE_WEIGHT * C, work / "P.pt")
        return {}
    if method == "reference":
        concepts = concept_pairs(n)
        table = load_table(work, n)
        c_oo, c_no, f_oo, f_no = statistics(tokenizer, table, concepts)
        del table
        exact, cond = exact_solution(original_weights, c_oo, c_no, P, LAMB, s)
        out = {"condition_number": cond, "errors": {}}
        for m in ("project", "original", "original-precomputed"):
            f = work / f"weights-{m}-{n}.pt"
            if f.exists():
                out["errors"][m] = errors(torch.load(f), exact, original_weights, c_oo)
        out["errors"]["original float32 arithmetic (emulated)"] = errors(
            original_arithmetic(original_weights, f_oo, f_no, P, LAMB, s), exact, original_weights, c_oo)
        out["errors"]["unedited"] = errors(original_weights, exact, original_weights, c_oo)
        # The same float32 arithmetic with a ridge (lamb 0.1, as the project's demo config), for
        # how much of its error is lamb 0's conditioning.
        ridge, cond_ridge = exact_solution(original_weights, c_oo, c_no, P, 0.1, s)
        out["with lamb 0.1"] = {"condition_number": cond_ridge, "original float32 arithmetic (emulated)": errors(
            original_arithmetic(original_weights, f_oo, f_no, P, 0.1, s), ridge, original_weights, c_oo)}
        return out

    concepts = concept_pairs(n)[:sub] if sub else concept_pairs(n)
    torch.set_grad_enabled(False)
    if method == "project":
        enc = Encoder(encoder, record=open(work / f"emb-{n}.bin", "wb"))
        pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=enc, unet=unet)
        warm = SimpleNamespace(tokenizer=tokenizer, text_encoder=Encoder(encoder), unet=unet)
        mace.refine(warm, concepts[0][:1], lam=LAMB, preserve=P, preserve_scale=s)
        set_projection_weights(unet, original_weights)

        def call():
            return mace.refine(pipe, [p for pairs in concepts for p in pairs], lam=LAMB, preserve=P, preserve_scale=s)
    else:
        cache = domain_cache_layers([lin for _, lin in cross_attention_projections(unet)], P / PRESERVE_WEIGHT)
        if method == "original":
            enc = Encoder(encoder)
        else:
            prompts = [q for pairs in concepts for p in pairs for q in (p.old, p.new)]
            enc = Encoder(encoder, table=load_table(work, n, (tokenizer, prompts)))
        kwargs = dict(lamb=LAMB, train_preserve_scale=TRAIN_PRESERVE_SCALE, preserve_weight=PRESERVE_WEIGHT)
        original_refinement(Encoder(encoder), tokenizer, unet, [concepts[0][:2]], cache, **kwargs)
        set_projection_weights(unet, original_weights)

        timings = {}

        def call():
            return original_refinement(enc, tokenizer, unet, concepts, cache, timings=timings, **kwargs)
    result, seconds, mem = _measure(call)
    if enc.record is not None:
        enc.record.close()
        (work / f"emb-{n}.json").write_text(json.dumps({"ids": enc.ids, "shape": [tokenizer.model_max_length,
                                                                                 original_weights[0].shape[1]]}))
    if not sub:
        torch.save([w.clone() for w in projection_weights(unet)], work / f"weights-{method}-{n}.pt")
    seconds -= enc.record_seconds
    out = {"seconds": seconds, "encode_seconds": enc.seconds if enc.table is None else 0.0,
           "lookup_seconds": enc.seconds if enc.table is not None else 0.0, "encoder_calls": enc.calls,
           "prompts_encoded": enc.prompts if enc.table is None else 0, "concepts": len(concepts), **mem}
    if method != "project":
        out["stored_values_mb"] = result / 2**20
        out["gc_seconds"] = timings["gc_seconds"]
    return out


def measure(method, n, work, model, sub=None, timeout=3600) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{method},{n},{sub or 0}", "--work", str(work), "--model", model]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "note": f"over {timeout} s"}
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr.strip().splitlines() or [f"killed by signal {-exc.returncode}"])[-1]
        return {"seconds": None, "note": last[:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def extrapolate(n, at, enc_per_prompt):
    """The original at n concepts from its run at fewer (``at``): every part of it but the 32
    d x d inverses is per concept (encoding, values through every layer, per-layer per-concept
    sums), so its non-encoding time and its stored tokens scale with n (the inverses, a few
    seconds, are scaled too: an overestimate of that much); encoding is 60 n prompts at the
    measured per-prompt time."""
    k = n / at["concepts"]
    rest = (at["seconds"] - at["encode_seconds"]) * k
    encode = 2 * PROMPTS_PER_CONCEPT * n * enc_per_prompt
    stored = at["stored_values_mb"] * k
    return {"seconds": rest + encode, "encode_seconds": encode, "non_encoding_seconds": rest,
            "gc_seconds": at["gc_seconds"] * (n + 32) / (at["concepts"] + 32),
            "above_baseline_mb": at["above_baseline_mb"] - at["stored_values_mb"] + stored, "stored_values_mb": stored,
            "prompts_encoded": 2 * PROMPTS_PER_CONCEPT * n, "concepts": n, "extrapolated_from": at["concepts"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="10,100")
    parser.add_argument("--original-max", type=int, default=10, help="largest n the original runs at in full")
    parser.add_argument("--precomputed", action="store_true",
                        help="also run the original with the recorded embeddings looked up (no encoding)")
    parser.add_argument("--model", default="builtin:sd14-shapes")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the recorded embeddings and each finished cell here; a rerun resumes from it")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        method, n, sub = args.one.split(",")
        print(json.dumps(run_one(method, int(n), args.work, args.model, int(sub) or None)))
        return 0
    if args.smoke:
        args.model, args.concepts = "builtin:tiny", "2"
    counts = [int(c) for c in args.concepts.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="refine-vs-original-"))
    work.mkdir(parents=True, exist_ok=True)
    done_file = work / "cells.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}

    def cell(method, n):
        key = f"{method},{n}"
        if key not in done or done[key].get("seconds", 0) is None:
            done[key] = measure(method, n, work, args.model, timeout=args.timeout)
            done_file.write_text(json.dumps(done))
        print(f"  {key}: {done[key]}", flush=True)
        return done[key]

    rows = []
    try:
        import torch

        if not (work / "P.pt").exists():
            torch.save(torch.zeros(1), work / "P.pt")  # replaced by the prep cell
            measure("prep", 0, work, args.model, timeout=args.timeout)
        smaller = None
        for n in counts:
            row = {"concepts": n, "project": cell("project", n)}
            if n <= args.original_max:
                row["original"] = cell("original", n)
                if args.precomputed:
                    row["original-precomputed"] = cell("original-precomputed", n)
                smaller = row["original"]
            elif smaller is not None and smaller.get("seconds") is not None:
                per_prompt = smaller["encode_seconds"] / smaller["prompts_encoded"]
                row["original"] = extrapolate(n, smaller, per_prompt)
            row["reference"] = cell("reference", n)
            rows.append(row)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    print("| concepts | method | s | encode s | prompts encoded | MB above baseline | rel. error of the edit | "
          "rel. output error |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        errs = row["reference"].get("errors", {})
        for m in ("project", "original", "original-precomputed"):
            c = row.get(m)
            if not c:
                continue
            err = errs.get(m) or (errs.get("original float32 arithmetic (emulated)") if m != "project" else None) or {}
            print(f"| {row['concepts']} | {m}{' (extrapolated)' if c.get('extrapolated_from') else ''} | "
                  f"{fmt(c.get('seconds'), '.1f')} | {fmt(c.get('encode_seconds'), '.1f')} | "
                  f"{fmt(c.get('prompts_encoded'), 'd')} | {fmt(c.get('above_baseline_mb'), '.0f')} | "
                  f"{fmt(err.get('rel_error_of_edit'), '.2e')} | {fmt(err.get('rel_output_error'), '.2e')} |")
    out = args.out or RESULTS / f"refine_vs_original-{'tiny-smoke' if args.smoke else 'sd14'}-cpu-{os.cpu_count()}cores.json"
    write_json_atomically(out, {
        "platform": platform.platform(), "cpus": os.cpu_count(), "model": args.model,
        "settings": {"lamb": LAMB, "train_preserve_scale": TRAIN_PRESERVE_SCALE, "preserve_weight": PRESERVE_WEIGHT,
                     "effective_preserve_scale": effective_scale(), "mapping": MAPPING,
                     "prompts_per_concept": PROMPTS_PER_CONCEPT, "preserved_prompts": PRESERVED_PROMPTS,
                     "original_run_in_full_up_to": args.original_max},
        "measured": "each cell a fresh process; seconds: wall time of the refinement (the project's less the time "
                    "spent recording its embeddings); memory: peak RSS above the RSS with the text encoder, the 32 "
                    "projections and the caches loaded and warmed up; errors against a float64 solve of the same "
                    "normal equations; load averages (1, 5, 15 min) at the start and end of each measurement",
        "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
