"""NeuroVFM-LLaVA: frozen-encoder features -> per-series perceiver -> MLP -> a Hugging Face causal LM.

A study is a list of series, each a variable-length set of frozen encoder tokens (n_i, enc_dim)
(an MR series gives one set; a CT volume gives one set per window: brain, blood, bone). The
perceiver resampler compresses every set independently to `n_latents` (64) latents; all sets of
a batch are packed back to back and attended with `varlen_attention` (cu_seqlens_q = 64 per set,
cu_seqlens_k = the set's token count), so nothing is padded. The latents of a study are
concatenated in series order, mapped by a 2-layer MLP into the LM embedding space and spliced
into the chat prompt at placeholder positions (one run of 64 positions per series, preceded by
the series name as text). The loss is next-token cross-entropy on the assistant reply only.

The LM is used through the generic HF interface only (get_input_embeddings, forward(inputs_embeds=...,
logits_to_keep=...), generate(inputs_embeds=...)), so any local causal LM works.
"""
import json
import os
import re
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nvfm.attention import varlen_attention

REPORT_PROMPT = "Generate a concise report of the key positive findings for this study."
STAGE1_PROMPT = "Describe the key findings of this study."
IMAGE_MARKER = "<nvfm-image>"  # split out of the rendered chat text; never tokenized
# series names the latents are told apart by (MR families, CT windows); unknown -> OTHER
SERIES_TYPES = ["T1", "T1C", "T2", "FLAIR", "DWI", "ADC", "SWI", "OTHER", "CT-brain", "CT-blood", "CT-bone"]
IGNORE = -100


def series_name(entry):
    """Display/type name of one feature-cache entry: MR family ("FLAIR") or CT window ("CT-blood")."""
    if entry.get("modality") == "CT" or entry.get("family") == "CT":
        return f"CT-{entry.get('window') or 'brain'}"
    fam = entry.get("family") or "OTHER"
    return fam if fam in SERIES_TYPES else "OTHER"


# ----------------------------------------------------------------------------- connector

class CrossAttentionBlock(nn.Module):
    """Pre-LN: latents += CrossAttn(LN(latents), LN(tokens)); latents += FF(LN(latents)) (4x GELU)."""

    def __init__(self, dim, heads, ff_mult=4):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, lat, tok, cu_q, cu_k, max_q, max_k, impl):
        """lat (S*L, dim), tok (N, dim) packed; returns (S*L, dim)."""
        h, d = self.heads, lat.shape[-1] // self.heads
        q = self.q(self.norm_q(lat)).view(-1, h, d)
        k, v = self.kv(self.norm_kv(tok)).view(-1, 2, h, d).unbind(1)
        o = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, impl=impl)
        lat = lat + self.proj(o.reshape(lat.shape))
        return lat + self.ff(self.norm_ff(lat))


def anatomical_positions(coords, orientation=None):
    """Token grid coords (n, 3) of one series -> (n, 3) float32 positions toward (right, anterior,
    superior), each in [-1, 1] across the series' tokens (0 = the middle of their bounding box: for a
    head cropped to its foreground, about the midline).

    orientation: the shard's axis codes (manifest "orientation", e.g. "IPR": grid axis 0 runs
    inferior, 1 posterior, 2 right), so an axial and a sagittal series agree on which side is right.
    None or unreadable: the grid axes are used as they are (D, H, W), which is only consistent
    between series stored alike."""
    c = np.asarray(coords, np.float32).reshape(-1, 3)
    out = np.zeros_like(c)
    if len(c) == 0:
        return out
    lo, hi = c.min(0), c.max(0)
    norm = (c - (lo + hi) / 2) / np.maximum((hi - lo) / 2, 1.0)
    ornt = np.array([[a, 1.0] for a in range(3)])  # grid axis i -> (R, A, S axis, direction)
    if isinstance(orientation, str) and len(orientation) == 3:
        from nibabel.orientations import axcodes2ornt
        try:
            o = axcodes2ornt(tuple(orientation.upper()))
            if not np.isnan(o).any() and len(set(o[:, 0])) == 3:
                ornt = o
        except ValueError:  # repeated or unknown codes: keep the grid axes
            pass
    for i, (j, sign) in enumerate(ornt):
        out[:, int(j)] = sign * norm[:, i]
    return out


def hemisphere_split(tok, cu_seqlens, right):
    """Packed tokens of S series -> 2S packed sets (left, right per series): tokens with right < 0,
    then > 0 (0, the midline, in both); an empty side takes all of its series' tokens.
    -> (tokens (N', d), cu_seqlens int32 (2S + 1), max_seqlen)."""
    idx, lens = [], []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        r = right[a:b]
        for side in (r <= 0, r >= 0):
            i = torch.nonzero(side).flatten() + a
            if i.numel() == 0:
                i = torch.arange(a, b, device=tok.device)
            idx.append(i)
            lens.append(i.numel())
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=tok.device)
    cu[1:] = torch.cumsum(torch.tensor(lens, device=tok.device), 0)
    return tok[torch.cat(idx)], cu, max(lens)


class PerceiverResampler(nn.Module):
    """Per-series perceiver: packed tokens of S series -> S x n_latents latents.

    forward(tokens (N, in_dim), cu_seqlens int32 (S+1), max_seqlen, series_type int64 (S,), pos=None)
    -> (S * n_latents, dim). Series s reads only tokens cu_seqlens[s]:cu_seqlens[s+1].

    Without hemispheres the perceiver sees a bag of tokens and cannot tell where a token lies (a left
    from a right lesion) unless the encoder's embedding says so.

    hemispheres: the first n_latents / 2 latents of a series read only its left tokens (pos right < 0),
    the other half only its right tokens (> 0; midline tokens go to both; a series with no token on
    one side lets that half read all its tokens). Which side a finding is on then comes down to which
    latents saw it, the same content read that finds the finding at all, instead of an interaction
    of content and position that the perceiver has to learn (`bench/bench_llava.py read --task=side`).
    """

    def __init__(self, in_dim, dim=768, depth=6, heads=8, n_latents=64, ff_mult=4, attn_impl="auto",
                 hemispheres=False):
        super().__init__()
        if hemispheres and n_latents % 2:
            raise ValueError(f"hemispheres needs an even n_latents (half per side), got {n_latents}")
        self.hemispheres = hemispheres
        self.n_latents, self.attn_impl, self.grad_ckpt = n_latents, attn_impl, False
        self.inp = nn.Linear(in_dim, dim)
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)
        self.type_emb = nn.Embedding(len(SERIES_TYPES), dim)  # tells the LM which series a set came from
        nn.init.normal_(self.type_emb.weight, std=0.02)
        self.blocks = nn.ModuleList([CrossAttentionBlock(dim, heads, ff_mult) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    @property
    def reads_positions(self):
        """Whether forward needs the tokens' positions (hemispheres)."""
        return self.hemispheres

    def forward(self, tokens, cu_seqlens, max_seqlen, series_type, pos=None):
        S, L = cu_seqlens.numel() - 1, self.n_latents
        if self.reads_positions and pos is None:
            raise ValueError("this perceiver reads token positions (hemispheres): pass pos (N, 3)")
        tok = self.inp(tokens)
        lat = (self.latents[None] + self.type_emb(series_type)[:, None]).reshape(S * L, -1)
        if self.hemispheres:  # 2S query sets of L / 2 latents: series s left, s right, s+1 left, ...
            tok, cu_seqlens, max_seqlen = hemisphere_split(tok, cu_seqlens, pos[:, 0])
            S, L = 2 * S, L // 2
        cu_q = torch.arange(S + 1, device=tokens.device, dtype=torch.int32) * L
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                lat = checkpoint(blk, lat, tok, cu_q, cu_seqlens, L, max_seqlen, self.attn_impl, use_reentrant=False)
            else:
                lat = blk(lat, tok, cu_q, cu_seqlens, L, max_seqlen, self.attn_impl)
        return self.norm(lat)


class Connector(nn.Module):
    """Perceiver resampler + 2-layer MLP (dim -> llm_hidden -> llm_hidden) into the LM embedding space."""

    def __init__(self, in_dim, llm_hidden, dim=768, depth=6, heads=8, n_latents=64, attn_impl="auto",
                 hemispheres=False):
        super().__init__()
        self.perceiver = PerceiverResampler(in_dim, dim, depth, heads, n_latents, attn_impl=attn_impl,
                                            hemispheres=hemispheres)
        self.mlp = nn.Sequential(nn.Linear(dim, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
        self.n_latents = n_latents

    def forward(self, tokens, cu_seqlens, max_seqlen, series_type, pos=None):
        """-> (S * n_latents, llm_hidden), series in packed order."""
        return self.mlp(self.perceiver(tokens, cu_seqlens, max_seqlen, series_type, pos))


def pack_series(studies, device="cpu", dtype=torch.float32, with_pos=False):
    """Pack the series of a batch of studies for the perceiver.

    studies: list (B) of lists of dicts with "emb" (n, enc_dim) array/tensor and family/window
    names (feature-cache entries). Sets with zero tokens are dropped (nothing to attend).
    Returns tokens (N, enc_dim), cu_seqlens int32 (S+1), max_seqlen, series_type int64 (S,),
    and per study the list of series names kept (so the prompt can name them in the same order).
    with_pos: also (last) the tokens' anatomical positions (N, 3), from each entry's "coords" and
    "orientation" (`anatomical_positions`); an entry without coords raises.
    """
    embs, lens, types, names, pos = [], [], [], [], []
    for study in studies:
        kept = []
        for e in study:
            x = torch.as_tensor(e["emb"])
            if x.ndim != 2 or x.shape[0] == 0:
                continue
            embs.append(x)
            lens.append(x.shape[0])
            if with_pos:
                if "coords" not in e:
                    raise ValueError(f"series {series_name(e)} has no token coords: the connector encodes positions")
                pos.append(torch.from_numpy(anatomical_positions(e["coords"], e.get("orientation"))))
            n = series_name(e)
            types.append(SERIES_TYPES.index(n) if n in SERIES_TYPES else SERIES_TYPES.index("OTHER"))
            kept.append(n)
        names.append(kept)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        tokens = torch.cat(embs).to(device=device, dtype=dtype)
    else:
        tokens = torch.zeros(0, 1, device=device, dtype=dtype)
    out = (tokens, cu.to(device), max(lens, default=0), torch.tensor(types, dtype=torch.long, device=device), names)
    if with_pos:
        out += ((torch.cat(pos) if pos else torch.zeros(0, 3)).to(device=device, dtype=dtype),)
    return out


# ----------------------------------------------------------------------------- prompts

def user_message(series_names, indication, stage):
    """The first user turn: one named image placeholder per series, then indication and prompt."""
    parts = [f"{n}: {IMAGE_MARKER}" for n in series_names]
    if stage == 1:
        parts.append(STAGE1_PROMPT)
    else:
        if indication:
            parts.append(f"Indication: {indication}")
        parts.append(REPORT_PROMPT)
    return "\n".join(parts)


def target_text(findings, stage):
    """Stage 1: findings concatenated into one string; stage 2: a JSON list (relevance order kept), non-ASCII
    text as written: \\uXXXX escapes share 4-grams that --no_repeat_ngram_size=4 decoding then corrupts."""
    return " ".join(findings) if stage == 1 else json.dumps(list(findings), ensure_ascii=False)


class PromptBuilder:
    """Token ids for (prompt [+ answer]) with runs of placeholder positions where images go."""

    def __init__(self, tok, n_latents):
        from nvfm.llm import end_of_turn_token
        self.tok, self.n_latents = tok, n_latents
        vocab = tok.get_vocab()
        self.placeholder_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eot = end_of_turn_token(tok)
        self.eot_id = vocab[self.eot]
        # wrap each image run in the model's own vision delimiters when it has them (Qwen)
        self.v_start = [vocab["<|vision_start|>"]] if "<|vision_start|>" in vocab else []
        self.v_end = [vocab["<|vision_end|>"]] if "<|vision_end|>" in vocab else []

    def _encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def build(self, series_names, indication, findings=None, stage=2):
        """-> dict(ids list[int], vision list[bool], labels list[int]); labels IGNORE except the answer."""
        msgs = [{"role": "user", "content": user_message(series_names, indication, stage)}]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        pieces = text.split(IMAGE_MARKER)
        if len(pieces) != len(series_names) + 1:
            raise ValueError("chat template changed the number of image placeholders")
        ids, vis = [], []
        for i, p in enumerate(pieces):
            t = self._encode(p)
            ids += t
            vis += [False] * len(t)
            if i < len(series_names):
                run = self.v_start + [self.placeholder_id] * self.n_latents + self.v_end
                ids += run
                vis += [False] * len(self.v_start) + [True] * self.n_latents + [False] * len(self.v_end)
        labels = [IGNORE] * len(ids)
        if findings is not None:
            ans = self._encode(target_text(findings, stage)) + [self.eot_id]
            ids += ans
            vis += [False] * len(ans)
            labels += ans
        return {"ids": ids, "vision": vis, "labels": labels}


# ----------------------------------------------------------------------------- model

class ReportGenerator(nn.Module):
    """Connector + LM. `studies` are lists of feature-cache entries (see pack_series)."""

    def __init__(self, llm, tok, enc_dim, dim=768, depth=6, heads=8, n_latents=64, attn_impl="auto",
                 hemispheres=False):
        super().__init__()
        self.llm, self.tok = llm, tok
        hidden = llm.get_input_embeddings().weight.shape[1]
        self.connector = Connector(enc_dim, hidden, dim, depth, heads, n_latents, attn_impl, hemispheres)
        self.prompts = PromptBuilder(tok, n_latents)
        # FSDP: every rank must run the connector's collectives, also on a batch without images
        self.always_run_connector = False

    @property
    def device(self):
        return self.llm.get_input_embeddings().weight.device

    def _embed(self, examples, visual, pad_left):
        """Right/left-padded inputs_embeds (B, T, H), attention mask (B, T), labels (B, T)."""
        emb_layer = self.llm.get_input_embeddings()
        B, T = len(examples), max(len(e["ids"]) for e in examples)
        pad = self.prompts.placeholder_id
        ids = torch.full((B, T), pad, dtype=torch.long)
        vis = torch.zeros(B, T, dtype=torch.bool)
        lab = torch.full((B, T), IGNORE, dtype=torch.long)
        att = torch.zeros(B, T, dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e["ids"])
            sl = slice(T - n, T) if pad_left else slice(0, n)
            ids[b, sl] = torch.tensor(e["ids"])
            vis[b, sl] = torch.tensor(e["vision"])
            lab[b, sl] = torch.tensor(e["labels"])
            att[b, sl] = 1
        dev = self.device
        ids, vis, lab, att = ids.to(dev), vis.to(dev), lab.to(dev), att.to(dev)
        x = emb_layer(ids)
        if visual is not None and visual.shape[0]:
            if int(vis.sum()) != visual.shape[0]:
                raise RuntimeError(f"{int(vis.sum())} placeholder positions but {visual.shape[0]} visual latents")
            x = x.masked_scatter(vis[..., None], visual.to(x.dtype))  # row-major = study, series order
        return x, att, lab

    def _visual(self, studies):
        with_pos = self.connector.perceiver.reads_positions
        tokens, cu, max_len, types, names, *pos = pack_series(
            studies, device=self.device, dtype=next(self.connector.parameters()).dtype, with_pos=with_pos)
        if cu.numel() == 1:
            return None, names
        return self.connector(tokens, cu, max_len, types, pos=pos[0] if pos else None), names

    def forward(self, studies, indications, findings, stage=2):
        """Mean next-token cross-entropy over the answer tokens of the batch (scalar)."""
        visual, names = self._visual(studies)
        ex = [self.prompts.build(n, ind, f, stage) for n, ind, f in zip(names, indications, findings)]
        x, att, lab = self._embed(ex, visual, pad_left=False)
        if visual is None and self.always_run_connector:
            # one zero token read into the inputs with weight 0: zero gradients, and the connector's
            # collectives run in the same order as on a rank whose batch has images
            p = next(self.connector.parameters())
            one = torch.zeros(1, self.connector.perceiver.inp.in_features, device=p.device, dtype=p.dtype)
            cu = torch.tensor([0, 1], dtype=torch.int32, device=p.device)
            typ = torch.tensor([SERIES_TYPES.index("OTHER")], device=p.device)
            x = x + 0 * self.connector(one, cu, 1, typ, pos=torch.zeros(1, 3, device=p.device, dtype=p.dtype)).sum()
        tgt = lab[:, 1:]
        # logits only at positions where a study has a target (the 151k-row LM head on prompt tokens is
        # wasted work), through the LM's own forward: its head may do more than the output embedding
        # (Gemma 2's final logit soft-capping), and generate() decodes from those logits
        cols = torch.nonzero((tgt != IGNORE).any(0)).flatten()
        logits = self.llm(inputs_embeds=x, attention_mask=att, use_cache=False, logits_to_keep=cols).logits
        tgt = tgt[:, cols]
        keep = tgt != IGNORE
        return F.cross_entropy(logits[keep].float(), tgt[keep])

    @torch.no_grad()
    def generate(self, studies, indications, stage=2, max_new_tokens=96, num_beams=1, repetition_penalty=1.0,
                 no_repeat_ngram_size=0, skip_special_tokens=True, return_ended=False, **generate_kwargs):
        """Batched deterministic decoding (greedy or beam). Returns the decoded reply strings, and with
        return_ended also per reply whether it ended with the end token (False: cut at max_new_tokens).
        repetition_penalty and no_repeat_ngram_size act on the reply only, not on the prompt (the
        prompt is embeddings, not ids): a finding may repeat words of the indication.
        generate_kwargs go to the LM's generate (e.g. min_new_tokens for fixed-length timing)."""
        visual, names = self._visual(studies)
        ex = [self.prompts.build(n, ind, None, stage) for n, ind in zip(names, indications)]
        x, att, _ = self._embed(ex, visual, pad_left=True)
        eos = sorted({self.prompts.eot_id} | ({self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()))
        with warnings.catch_warnings():  # transformers says so for every batch; the docstring says it once
            warnings.filterwarnings("ignore", r"Passing `(repetition_penalty|no_repeat_ngram_size)` with "
                                    r"`inputs_embeds`", UserWarning)
            out = self.llm.generate(inputs_embeds=x, attention_mask=att, max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=num_beams, repetition_penalty=repetition_penalty,
                                    no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos,
                                    pad_token_id=self.prompts.placeholder_id, temperature=None, top_p=None,
                                    top_k=None, **generate_kwargs)
        texts = [self.tok.decode(o, skip_special_tokens=skip_special_tokens).strip() for o in out]
        if not return_ended:
            return texts
        return texts, torch.isin(out, torch.tensor(eos, device=out.device)).any(1).tolist()


# ----------------------------------------------------------------------------- study records

def sampling_weights(label_sets, power=1.0):
    """Training-study draw weights: (1 / prevalence of the study's rarest label) ** power, float64.

    label_sets: per study its set of labels; an empty set counts as the pseudo-label
    "unremarkable". power 1 (the paper) balances the labels: every label's studies together get about
    the same share of the draws, so unremarkable studies, one label among many, become rare (5% of
    the draws on the 400-study phantom cohort, where they are 35% of the studies) and a model
    trained that way reports a finding for every study. power 0.5 softens this (15% there) and
    power 0 draws studies uniformly."""
    sets = [s or {"<unremarkable>"} for s in label_sets]
    count = {}
    for s in sets:
        for lab in s:
            count[lab] = count.get(lab, 0) + 1
    n = len(sets)
    return torch.tensor([(n / min(count[lab] for lab in s)) ** power for s in sets], dtype=torch.float64)


def read_findings(path):
    """{study_key: record} of a shards folder's findings.jsonl (preprocess.py's re-keyed copy).

    ValueError naming the file and line, before anything trains, for what report_metrics refuses after
    it (report_metrics.read_truth): 'findings' not a list of strings (a string trained as a list of its
    letters), a study twice; and a record without study_key."""
    from nvfm.report_metrics import read_truth
    if not os.path.exists(path):
        raise FileNotFoundError(f"--findings={path}: no such file (SHARDS/findings.jsonl from preprocess.py)")
    return read_truth(path, keys=("study_key",), hint=" (use the re-keyed copy in the shards folder)")[0]


def study_labels(recs, path):
    """{study_key: set of positive diagnoses}: labels.csv beside findings.jsonl, else the findings text."""
    import csv
    from nvfm.ontology import DIAGNOSES
    from nvfm.report_metrics import report_diagnoses
    csv_path = os.path.join(os.path.dirname(path), "labels.csv")
    out = {k: set(report_diagnoses(r.get("findings") or [])) for k, r in recs.items()}
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                if row.get("study_key") in out:
                    out[row["study_key"]] = {c for c in DIAGNOSES if row.get(c) == "1"}
    return out


# ----------------------------------------------------------------------------- token subsets and shard manifests

def keep_tokens(entry, frac, gen=None):
    """A feature-cache entry with a random subset of round(frac * n) of its tokens (at least 1), in their
    original order: train_llava's token_keep augmentation. coords, when present, follow the tokens."""
    n = len(entry["emb"])
    m = min(n, max(1, round(frac * n)))
    if m == n:
        return entry
    idx = torch.randperm(n, generator=gen)[:m].sort().values
    out = dict(entry, emb=entry["emb"][idx])
    if "coords" in entry:
        out["coords"] = entry["coords"][idx.numpy()]
    return out


def manifest_volumes(shards_dir):
    """The volume records of a shards folder's manifest.json ([] without one)."""
    path = os.path.join(shards_dir, "manifest.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["volumes"]


def volume_orientations(shards_dir):
    """{volume_id: axis codes of its stored grid, e.g. "IPR"} from a shards folder's manifest."""
    return {v["volume_id"]: v["orientation"] for v in manifest_volumes(shards_dir) if v.get("orientation")}


# ----------------------------------------------------------------------------- output parsing

_STRING = re.compile(r'"((?:[^"\\]|\\.)*)("|$)', re.S)


def parse_findings(text):
    """Parse a generated reply as a JSON list of finding strings; never raises.

    Returns (findings list[str], status) with status "ok" (valid JSON list of strings),
    "repaired" (recovered from malformed JSON: unterminated list/string, trailing text,
    non-string items, or plain sentences) or "empty" (nothing usable).
    """
    s = (text or "").strip()
    start = s.find("[")
    if start >= 0:
        end = s.rfind("]")
        if end > start:
            try:
                val = json.loads(s[start:end + 1])
                if isinstance(val, list):
                    clean = [v.strip() for v in val if isinstance(v, str) and v.strip()]
                    if len(clean) == len(val):   # text around the list is not the reply asked for
                        return clean, "ok" if start == 0 and end == len(s) - 1 else "repaired"
                    items = clean or [t for t in (str(v).strip() for v in val if v is not None) if t]
                    return items, "repaired" if items else "empty"
            except json.JSONDecodeError:
                pass
        items = []
        for m in _STRING.finditer(s[start:]):
            try:
                items.append(json.loads('"' + m.group(1) + '"'))
            except json.JSONDecodeError:
                items.append(m.group(1))
        items = [i.strip() for i in items if i.strip()]
        if items:
            return items, "repaired"
    # no list at all: fall back to sentences / lines
    items = [p.strip(" -*\t\"'[]") for p in re.split(r"[\n;]|(?<=\.)\s+", s)]
    items = [p for p in items if p]
    return items, ("repaired" if items else "empty")


# ----------------------------------------------------------------------------- probe cross-check

def probe_diagnosis_scores(label_names, logits, thresholds, trained=None, fitted=None):
    """One study's probe output -> ({diagnosis: logit}, {diagnosis: threshold}) for cross_check.

    Keeps ontology diagnoses only, and drops classes the probe never learned (`trained` False:
    `probe.untrained_classes`, no training positives or no training negatives): train_probe.py
    leaves them out of the loss, so their logits are noise, and appending them would only
    hallucinate. `fitted` (bools) marks classes whose threshold was fitted on the selection split;
    the others (a default threshold) are dropped. None: every class.
    """
    from nvfm.ontology import DIAGNOSES
    ok_t = trained if trained is not None else [True] * len(label_names)
    ok_f = fitted if fitted is not None else [True] * len(label_names)
    if not len(label_names) == len(logits) == len(thresholds) == len(ok_t) == len(ok_f):
        raise ValueError(f"probe output: {len(label_names)} names, {len(logits)} logits, "
                         f"{len(thresholds)} thresholds, {len(ok_t)} trained flags, {len(ok_f)} fitted flags")
    sc, th = {}, {}
    for n, v, t, a, b in zip(label_names, logits, thresholds, ok_t, ok_f):
        if n in DIAGNOSES and a and b:
            sc[n], th[n] = float(v), float(t)
    return sc, th


def _scored_name(name, modality):
    """The name report_metrics scores diagnosis `name` by in a study of `modality`: its same_finding name,
    and in an MR study a dated subdural hematoma is the MR ontology's subdural_hematoma (report_metrics.in_modality)."""
    from nvfm.ontology import same_finding
    from nvfm.report_metrics import in_modality
    return next(iter(in_modality({same_finding(name): None}, modality)))


def cross_check(findings, probe_scores, thresholds, mode="append", urgent_only=True, modality=None):
    """Reconcile a report with the diagnostic probe.

    findings: list[str]; probe_scores: {diagnosis: probability}; thresholds: {diagnosis: t} or a
    float. A diagnosis the probe calls positive (score >= threshold), urgent (when urgent_only), and
    that the report does not mention is "missed" (once per finding: of its CT and MR names called, the
    higher scored). Names are compared as report_metrics scores them in a study of `modality` (the
    findings record's): in an MR study the report's "chronic subdural hematoma" is the MR probe's
    subdural_hematoma, not a miss. mode "append" adds a finding naming it and marked as probe-detected;
    "flag" leaves the text alone; "off" does nothing.
    Returns (findings, missed list[str]).
    """
    from nvfm.ontology import DIAGNOSES
    from nvfm.report_metrics import diagnosis_phrase, extract_diagnoses

    if mode == "off" or not probe_scores:
        return list(findings), []
    mentioned = {_scored_name(d, modality) for f in findings for d, _ in extract_diagnoses(f)}
    missed = []
    for name, p in sorted(probe_scores.items(), key=lambda kv: -kv[1]):
        if name not in DIAGNOSES:
            continue
        t = thresholds if isinstance(thresholds, (int, float)) else thresholds.get(name, 0.5)
        # mentions are by scored name: an MR probe's brain_midline_shift is the report's "midline shift"
        key = _scored_name(name, modality)
        if p >= t and key not in mentioned and (not urgent_only or DIAGNOSES[name].urgency == "urgent"):
            missed.append(name)
            mentioned.add(key)  # its CT and MR names (an 'all' probe scores both) are one finding
    if mode == "append":
        findings = list(findings) + [f"{diagnosis_phrase(n).capitalize()} (detected by image probe)" for n in missed]
    elif mode != "flag":
        raise ValueError(f"cross-check mode must be append, flag or off, got {mode!r}")
    return list(findings), missed


def fit_cross_check_thresholds(reports, probe_scores, truths, target=0.5, min_tp=2, urgent_only=True):
    """Per-diagnosis cross-check thresholds fitted on held-out reports, so that what the cross-check
    appends is right `target` of the time.

    The probe's own precision (metrics.precision_thresholds on its selection split) is not the
    precision of the appended findings: the cross-check only appends a diagnosis the report omits,
    and the report already names most of the positives the probe finds (a mass and its mass
    effect alike), so among omitted ones the probe's positives are mostly false. Here each
    diagnosis is fitted on the studies whose report omits it: the lowest probe score whose calls
    among them are true positives at least `target` of the time (with >= min_tp of them).

    reports: list[list[str]] (findings of each study); probe_scores: list[{diagnosis: score}];
    truths: list[findings.jsonl record] (ground truth), all of the same studies (the fit split,
    e.g. val; then score the cross-check on other studies only); names are compared as cross_check
    compares them in a study of the record's modality. Returns {diagnosis: threshold},
    +inf for a diagnosis that never reaches the target (never appended).
    """
    from nvfm.metrics import precision_thresholds
    from nvfm.ontology import DIAGNOSES
    from nvfm.report_metrics import in_modality, report_diagnoses, truth_diagnoses

    if not len(reports) == len(probe_scores) == len(truths):
        raise ValueError(f"{len(reports)} reports, {len(probe_scores)} probe score sets, {len(truths)} truths")
    # as report_metrics scores them: in an MR study a dated subdural hematoma is the MR probe's subdural_hematoma
    said = [set(in_modality(report_diagnoses(f), t.get("modality"))) for f, t in zip(reports, truths)]
    true = [set(in_modality(truth_diagnoses(t), t.get("modality"))) for t in truths]
    names = sorted({n for sc in probe_scores for n in sc if n in DIAGNOSES
                    and (not urgent_only or DIAGNOSES[n].urgency == "urgent")})
    out = {}
    for n in names:
        key = [_scored_name(n, t.get("modality")) for t in truths]
        idx = [i for i, sc in enumerate(probe_scores) if n in sc and key[i] not in said[i]]
        if not idx:
            out[n] = float("inf")
            continue
        y = np.array([[key[i] in true[i]] for i in idx], np.int64)
        s = np.array([[probe_scores[i][n]] for i in idx], np.float64)
        out[n] = float(precision_thresholds(y, s, target, min_tp)[0])
    return out


def connector_flops(n_tokens, n_series, in_dim, dim, depth, n_latents, llm_hidden, ff_mult=4):
    """Forward FLOPs of the connector for a packed batch (matmuls only, 2 per MAC)."""
    L = n_series * n_latents
    f = 2 * n_tokens * in_dim * dim
    per = 2 * L * dim * dim * 2 + 2 * n_tokens * dim * 2 * dim + 4 * n_latents * n_tokens * dim  # q,o; kv; QK^T,PV
    per += 2 * L * dim * ff_mult * dim * 2
    f += depth * per
    f += 2 * L * (dim * llm_hidden + llm_hidden * llm_hidden)
    return f
