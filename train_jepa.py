"""Vol-JEPA pretraining of the 3D ViT encoder (the NeuroVFM paper, Methods: Vol-JEPA), nanoGPT style.

A student encoder sees the context tokens of each volume; the predictor takes its latents
plus mask tokens at the target positions and predicts the target latents; the teacher, an
EMA of the student, encodes all tokens, its output passes a parameter-free LayerNorm and
gives the targets. Loss: smooth L1 (beta 1). Only student and predictor get gradients.

    python train_jepa.py config/jepa_tiny.py --shards=SHARDS --out_dir=out/jepa_tiny
    torchrun --standalone --nproc_per_node=8 train_jepa.py config/jepa_vitb.py --shards=SHARDS
Resume after a stop (SIGTERM/SIGINT also write a checkpoint): add --init_from=resume, with the same
settings (a changed setting that alters training, or another shard set, is refused; RESUME_MAY_CHANGE).
Outputs in out_dir: ckpt.pt (full training state), encoder.safetensors (+ .json), log.jsonl.
"""
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nvfm.attention import IMPLS as _ATTENTION_IMPLS  # private: not a setting, not in the stored config
from nvfm.checkpoint import changed_settings, load_checkpoint, load_state_strict, resume_refusal, save_atomic
from nvfm.configurator import config_dict, configure, fail
from nvfm.data import ShardReader, write_atomic
from nvfm.features import file_hash
from nvfm.loader import JepaBatches, make_loader, train_indices
from nvfm.masks import MaskConfig
from nvfm.monitor import (CollapseWatch, ProbeSet, content_loss, effective_rank, intensity_share, mean_std,
                          relative_distance)
from nvfm.model import (SIZES, Encoder, EncoderConfig, Predictor, PredictorConfig, encoder_flops, normalize_tokens,
                        predictor_flops, save_encoder)

# ----------------------------------------------------------------------------- config
shards = ""                        # a shard set written by preprocess.py (required)
split = "train"
out_dir = "out/jepa"
init_from = "scratch"              # "scratch" | "resume" (out_dir/ckpt.pt)
model_size = "vitb"                # tiny | vits | vitm | vitb | vitl (nvfm.model.SIZES)
predictor_dim = 0                  # 0: same as the encoder (the reference predictor)
predictor_depth = 0
predictor_heads = 0
global_batch = 768                 # volumes per step over all ranks
max_steps = 510_000
lr_start, lr_peak, lr_final = 1e-4, 3.75e-4, 1e-6
warmup_frac = 0.1                  # linear warm-up, then cosine to lr_final
wd_start, wd_end = 0.05, 0.05      # weight decay, cosine from start to end
beta1, beta2 = 0.9, 0.999
ema_start, ema_end = 0.994, 1.0    # teacher momentum, linear
grad_clip = 1.0
context_ratio_mr, context_ratio_ct, context_drop = 0.25, 0.20, 0.20
max_patches = 20                   # training crop, tokens per axis
min_tokens = 8                     # skip volumes with fewer foreground tokens
attention = "auto"                 # nvfm.attention impl: auto | ours | sdpa | torch_varlen | reference
amp_dtype = "bfloat16"             # autocast dtype on GPU (CPU runs in float32)
grad_checkpointing = False
compile = False
num_workers = 4
seed = 0
log_interval = 10
ckpt_interval = 1000
stop_at_step = 0                   # > 0: checkpoint and exit after this step (a time-limited job slot)
# is it learning? (README "Is my pretraining learning?")
collapse_warn = 0.25               # warn when the student's effective rank < this x its rank on the first batch
position_control = False           # also train a predictor that gets no context latents (positions only)
eval_interval = 0                  # > 0: frozen-feature probes of student and teacher every this many steps
probe_studies = 32                 # studies in the online probe set (0: all); every split, labels never trained on
probe_cohort = ""                  # the demo cohort folder (with gt/): adds the lesion-token probe (features alone, and with positions)
export = "teacher"                 # the encoder written as encoder.safetensors; the other one is written too
device = "auto"                    # auto | cpu | cuda
configure(globals())
config = config_dict(globals())
# a misspelt choice is one line naming it before anything is read or written (it was a traceback, exit 2)
for key, choices in (("init_from", ("scratch", "resume")), ("model_size", tuple(SIZES)), ("attention", _ATTENTION_IMPLS),
                     ("amp_dtype", ("bfloat16", "float16", "float32")), ("export", ("teacher", "student"))):
    if config[key] not in choices:
        fail(f"--{key}={config[key]!r}: choose one of {', '.join(choices)}")
try:
    torch.device("cpu" if device == "auto" else device)
except RuntimeError:
    fail(f"--device={device!r}: choose auto, cpu, cuda or cuda:<index>")
# settings that may change on --init_from=resume: they do not change the trained weights (logging,
# checkpointing, monitoring, where and how fast it runs, where it stops). Every other setting must
# equal the checkpoint's; the shard set is compared by its manifest's content (below), not its path.
RESUME_MAY_CHANGE = ("out_dir", "init_from", "shards", "num_workers", "compile", "device", "attention",
                     "grad_checkpointing", "log_interval", "ckpt_interval", "stop_at_step", "collapse_warn",
                     "eval_interval", "probe_studies", "probe_cohort", "export")

# ----------------------------------------------------------------------------- distributed set-up
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0
dev = torch.device(device)
if global_batch % world_size:
    raise SystemExit(f"global_batch {global_batch} must be divisible by the {world_size} ranks")
torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts it)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
use_amp = dev.type == "cuda"
ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[amp_dtype]

# ----------------------------------------------------------------------------- data
if not shards or not os.path.exists(os.path.join(shards, "manifest.json")):
    raise SystemExit(f"train_jepa.py: --shards={shards!r} is not a preprocess.py output (no manifest.json)")
try:
    reader = ShardReader(shards)
except ValueError as e:  # a shard file cut short, a format this version does not read
    fail(str(e))
shards_id = file_hash(os.path.join(shards, "manifest.json"))  # the shard set's identity: moves keep it, new data changes it
try:  # a setting out of range is one line naming it, before anything is written
    mask_config = MaskConfig(ratio_mr=context_ratio_mr, ratio_ct=context_ratio_ct, drop=context_drop,
                             max_patches=max_patches)
except ValueError as e:
    fail(str(e))
# a volume no training crop can serve would stop the run in a data-loader worker: left out here, each named
indices = train_indices(reader, split, min_tokens, max_patches, warn=print if master else None)
if not indices:
    fail(f"{shards}: no '{split}' volume with >= {min_tokens} foreground tokens that a crop of <= {max_patches} "
         f"tokens per axis can split (warnings above)")
try:  # the batch stream: a global batch, seed or rank it cannot make is one line
    dataset = JepaBatches(reader, indices, global_batch, rank, world_size, seed, mask_config)
except ValueError as e:
    fail(str(e))

# ----------------------------------------------------------------------------- model
enc_cfg = EncoderConfig.preset(model_size)
pred_cfg = PredictorConfig(enc_dim=enc_cfg.dim, dim=predictor_dim or enc_cfg.dim, depth=predictor_depth or enc_cfg.depth,
                           heads=predictor_heads or enc_cfg.heads, mlp_ratio=enc_cfg.mlp_ratio, pos_dim=enc_cfg.pos_dim)


class VolJEPA(nn.Module):
    """The trained part (student + predictor), one module so DDP syncs both. With
    position_control, a second predictor gets the same layout but zeros instead of the context
    latents: its loss says how much of the targets the positions alone predict."""

    def __init__(self):
        super().__init__()
        self.student = Encoder(enc_cfg)
        self.predictor = Predictor(pred_cfg)
        self.pos_predictor = Predictor(pred_cfg) if position_control else None

    def forward(self, x, coords, b):
        """-> (predicted targets, student context latents, position-only predictions or None)."""
        ctx, tgt = b["ctx_index"], b["tgt_index"]
        z = self.student(x[ctx], coords[ctx], b["cu_ctx"], b["max_ctx"])
        layout = (b["pred_ctx_pos"], b["pred_tgt_pos"], b["pred_cu"], b["pred_max"])
        pred = self.predictor(z, coords[ctx], coords[tgt], layout)
        pos = self.pos_predictor(torch.zeros_like(z), coords[ctx], coords[tgt], layout) if position_control else None
        return pred, z, pos


try:  # a size with no room for the context beside the position code is one line
    model = VolJEPA().to(dev)
except ValueError as e:
    fail(str(e))
if master:
    os.makedirs(out_dir, exist_ok=True)
teacher = Encoder(enc_cfg).to(dev)
teacher.load_state_dict(model.student.state_dict())
teacher.requires_grad_(False)
teacher_init = [p.detach().clone() for p in teacher.parameters()]  # the monitors' reference (same seed on resume)
for m in (model.student, model.predictor, model.pos_predictor, teacher):
    if m is not None:
        m.set_attention(attention)
model.student.blocks.grad_checkpointing = grad_checkpointing
model.predictor.blocks.grad_checkpointing = grad_checkpointing

main_params = [p for n, p in model.named_parameters() if not n.startswith("pos_predictor.")]  # clipped together


def make_optimizer(params):
    """AdamW; no weight decay on biases, norms and the mask token (1-d parameters)."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "wd": True},
              {"params": [p for p in params if p.dim() < 2], "wd": False, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr_start, betas=(beta1, beta2), weight_decay=wd_start, fused=dev.type == "cuda")


optimizer = make_optimizer(main_params)
scaler = torch.amp.GradScaler(dev.type, enabled=use_amp and ptdtype == torch.float16)
# the position-only control steps with an optimizer and a float16 loss scale of its own: a step its
# gradients overflow skips its update only, never the main run's
pos_optimizer = make_optimizer(list(model.pos_predictor.parameters())) if position_control else None
pos_scaler = torch.amp.GradScaler(dev.type, enabled=use_amp and ptdtype == torch.float16)

def logged_step(line):
    """The step of a log.jsonl record; inf for a blank line or one a kill cut in half (never kept)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


step, collapse_ref, collapse_warned = 0, None, False   # collapse_ref: the student's rank on the run's first batch (the warning's reference)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from == "resume":
    ck = load_checkpoint(ckpt_path)
    changes = changed_settings(ck.get("config", {}), config, RESUME_MAY_CHANGE)
    if ck.get("shards_id", shards_id) != shards_id:
        changes.insert(0, f"shards {ck['config'].get('shards')!r} (manifest {ck['shards_id'][:19]}) -> "
                          f"{shards!r} (manifest {shards_id[:19]})")
    elif "shards_id" not in ck and ck.get("config", {}).get("shards", shards) != shards:  # an older checkpoint
        changes.insert(0, f"shards {ck['config']['shards']!r} -> {shards!r}")
    if changes:
        fail(resume_refusal(ckpt_path, changes))
    saved = vars(EncoderConfig.from_dict(ck["encoder_config"]))
    if saved != vars(enc_cfg):
        raise SystemExit(f"{ckpt_path}: the checkpoint's encoder {saved} differs from this run's {vars(enc_cfg)}; "
                         f"resume with the settings it was started with")
    parts = [(model.student, "student"), (model.predictor, "predictor"), (teacher, "teacher")]
    for module, name in parts + ([(model.pos_predictor, "pos_predictor")] if position_control else []):
        if name not in ck:
            fail(f"{ckpt_path}: holds no {name} weights (not a train_jepa.py checkpoint of this run)")
        try:
            load_state_strict(module, ck[name], f"{ckpt_path} {name}")
        except RuntimeError as e:
            fail(str(e))
    states = [(optimizer, "optimizer"), (scaler, "scaler")]
    states += [(pos_optimizer, "pos_optimizer"), (pos_scaler, "pos_scaler")] if position_control else []
    for obj, name in states:
        if name not in ck:   # a control run saved before the control had an optimizer of its own
            fail(f"{ckpt_path}: holds no {name} state (saved by an older train_jepa.py); start the run again")
        try:
            obj.load_state_dict(ck[name])
        except (ValueError, KeyError, RuntimeError) as e:
            fail(f"{ckpt_path} {name}: {e}")
    step, collapse_ref, collapse_warned = ck["step"], ck.get("collapse_ref"), ck.get("collapse_warned", False)
    torch.set_rng_state(ck["rng"]["torch"])  # data randomness is a function of (seed, step, slot): nothing else to restore
    if master:
        print(f"resumed from {ckpt_path} at step {step}")
        log_path = os.path.join(out_dir, "log.jsonl")
        if os.path.exists(log_path):  # records of a killed run past its checkpoint are logged again below
            with open(log_path) as f:
                kept = [line for line in f if logged_step(line) <= step]
            write_atomic(log_path, "".join(kept))

raw_model = model
if compile:
    model = torch.compile(model, dynamic=True)
if ddp:
    model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


# ----------------------------------------------------------------------------- schedules
def lr_at(s):
    """Linear warm-up lr_start -> lr_peak over warmup_frac of the run, then cosine to lr_final."""
    # floor with a float margin (0.58 * 50 = 28.999999999999996 gave 28 steps); 0: no warm-up (it forced 1)
    warm = math.floor(warmup_frac * max_steps + 1e-9)
    if s < warm:
        return lr_start + (lr_peak - lr_start) * s / warm
    t = (s - warm) / max(1, max_steps - warm)
    return lr_final + 0.5 * (lr_peak - lr_final) * (1 + math.cos(math.pi * t))


def wd_at(s):
    return wd_end + 0.5 * (wd_start - wd_end) * (1 + math.cos(math.pi * s / max_steps))


def momentum_at(s):
    return ema_start + (ema_end - ema_start) * s / max_steps


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def step_flops(b):
    """Training FLOPs of one local batch on its real packed lengths: student and predictor
    forward + backward (3x forward), teacher forward (1x)."""
    lens = (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).tolist()
    lc = b["cu_ctx"].diff().tolist()
    pred = predictor_flops(pred_cfg, lc, b["pred_cu"].diff().tolist())
    return 3 * (encoder_flops(enc_cfg, lc) + pred) + encoder_flops(enc_cfg, lens)


def peak_flops():
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- checkpoint and stop signals
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)


def save_checkpoint(next_step):
    if not master:
        return
    extra = {"pos_predictor": raw_model.pos_predictor.state_dict(), "pos_optimizer": pos_optimizer.state_dict(),
             "pos_scaler": pos_scaler.state_dict()} if position_control else {}
    save_atomic({"student": raw_model.student.state_dict(), "predictor": raw_model.predictor.state_dict(),
                 "teacher": teacher.state_dict(), **extra, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": next_step, "config": config, "encoder_config": vars(enc_cfg), "shards_id": shards_id,
                 "rng": {"torch": torch.get_rng_state()}, "collapse_ref": watch.initial,
                 "collapse_warned": watch.warned}, ckpt_path)


# ----------------------------------------------------------------------------- is it learning?
watch = CollapseWatch(collapse_warn, initial=collapse_ref)   # a resumed run keeps step 1's reference
watch.warned = collapse_warned  # and does not warn again within the episode it was stopped in
probes = ProbeSet(shards, cohort=probe_cohort or None, max_studies=probe_studies) if eval_interval and master else None


def log(rec, text=None):
    if master:
        if text:
            print(text, flush=True)
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()


def run_probes(at_step):
    """Frozen-feature probes of student and teacher on the fixed probe set (master only)."""
    res = {name: probes(enc) for name, enc in (("student", raw_model.student), ("teacher", teacher))}  # modes kept
    keys = ("rank", "lesion_auroc", "lesion_auroc_pos", "lesion_auroc_dx", "study_auroc")
    fmt = lambda r: " ".join(f"{k} {r[k]:.3f}" for k in keys if k in r)
    log(dict(step=at_step, probe=res), f"probe @ {at_step}: student {fmt(res['student'])} | teacher {fmt(res['teacher'])}")


def save_encoders():
    other = "student" if export == "teacher" else "teacher"
    nets = {"teacher": teacher, "student": raw_model.student}
    save_encoder(nets[export], os.path.join(out_dir, "encoder.safetensors"))
    save_encoder(nets[other], os.path.join(out_dir, f"{other}.safetensors"))


# ----------------------------------------------------------------------------- training loop
last_step = min(max_steps, stop_at_step) if stop_at_step else max_steps  # a resumed run already there trains nothing
loader = make_loader(dataset, step, last_step, num_workers, pin_memory=dev.type == "cuda")
if master and init_from == "scratch" and os.path.exists(ckpt_path):  # e.g. a job script without --init_from=resume
    print(f"warning: {out_dir} holds another run's checkpoint: this run from scratch replaces it and its log "
          f"(--init_from=resume continues it)", flush=True)
# a run from scratch starts its own log: appended to another run's, every step was logged twice
log_file = open(os.path.join(out_dir, "log.jsonl"), "a" if init_from == "resume" else "w") if master else None
if probes is not None and step == 0:
    run_probes(0)
t_log, tok_log, vol_log, flops_log, loss_log, pos_log, n_log = time.time(), 0, 0, 0.0, 0.0, 0.0, 0
for b in loader:
    lr, wd, mom = lr_at(step), wd_at(step), momentum_at(step)
    for g in optimizer.param_groups + (pos_optimizer.param_groups if position_control else []):
        g["lr"] = lr
        if g["wd"]:
            g["weight_decay"] = wd
    b = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
    x = normalize_tokens(b["tokens"], b["window"])
    coords = b["coords"]
    n_tgt = torch.tensor(float(b["tgt_index"].numel()), device=dev)
    if ddp:  # the loss is a mean over the global batch's target tokens, whatever the split across ranks
        # ranks stop together: a stop signal any rank has seen by now stops every rank after this step
        # (a rank stopping alone left the others blocked in their next collective)
        n_tgt = torch.stack([n_tgt, torch.tensor(float(stop_requested), device=dev)])
        dist.all_reduce(n_tgt)
        n_tgt, stop_seen = n_tgt[0], bool(n_tgt[1] > 0)
    with torch.autocast(dev.type, dtype=ptdtype, enabled=use_amp):
        with torch.no_grad():
            h = teacher(x, coords, b["cu_seqlens"], b["max_seqlen"])
            target = F.layer_norm(h.float(), (h.shape[-1],))[b["tgt_index"]]
        pred, z, pred_pos = model(x, coords, b)
        loss_sum = F.smooth_l1_loss(pred.float(), target, reduction="sum", beta=1.0) / target.shape[-1]
        pos_sum = F.smooth_l1_loss(pred_pos.float(), target, reduction="sum", beta=1.0) / target.shape[-1] \
            if position_control else torch.zeros((), device=dev)
    loss, loss_pos = loss_sum * world_size / n_tgt, pos_sum * world_size / n_tgt  # DDP averages gradients over ranks
    # one backward for both (DDP reduces once): the control predictor's input is zeros, so no gradient of
    # its loss reaches the student, and each loss carries its own float16 scale
    (scaler.scale(loss) + (pos_scaler.scale(loss_pos) if position_control else 0.0)).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(main_params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if position_control:  # clipped and stepped on its own, so the control never changes the main run
        pos_scaler.unscale_(pos_optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.pos_predictor.parameters(), grad_clip)
        pos_scaler.step(pos_optimizer)
        pos_scaler.update()
        pos_optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # teacher = EMA of the student, its only update
        t_params, s_params = list(teacher.parameters()), list(raw_model.student.parameters())
        torch._foreach_lerp_(t_params, s_params, 1.0 - mom)
    step += 1

    tok_log += int(b["cu_seqlens"][-1])  # this rank's; summed over the ranks at the log
    vol_log += global_batch
    flops_log += step_flops(b)
    loss_log, pos_log, n_log = loss_log + loss.detach(), pos_log + loss_pos.detach(), n_log + 1  # no sync until the log
    stop = (stop_seen if ddp else stop_requested) or bool(stop_at_step and step >= stop_at_step)
    # every step counted in one log record; a checkpoint's step is logged, so a resumed log (cut at it) misses none
    if step == 1 or step % log_interval == 0 or step % ckpt_interval == 0 or step == max_steps or stop:
        # collapse monitors on this batch's features (this rank's part; no extra forward)
        z_rank = effective_rank(z)
        ctx, tgt = b["ctx_index"], b["tgt_index"]
        m_tgt, w_tgt = x[tgt].mean(1), b["window"][tgt]  # the target tokens' brightness and window
        share = intensity_share(z, x[ctx].mean(1), b["window"][ctx])  # what a collapse keeps
        warning = watch.update(z_rank, share)  # the first batch's rank is the reference
        stats = torch.stack([loss_log / (n_log * world_size), pos_log / (n_log * world_size)])
        counts = torch.tensor([tok_log, flops_log], dtype=torch.float64, device=dev)
        if ddp:  # ranks' batches differ in length: rank 0's tokens x world_size was not the global count
            dist.all_reduce(stats)
            dist.all_reduce(counts)
        tok_log, flops_log = counts.tolist()
        dt = time.time() - t_log
        peak = peak_flops()
        rec = dict(step=step, loss=stats[0].item(), lr=lr, wd=wd, momentum=mom, grad_norm=float(grad_norm),
                   tokens_per_s=tok_log / dt, volumes_per_s=vol_log / dt, tflops=flops_log / dt / 1e12,
                   mfu=flops_log / dt / (peak * world_size) if peak else None,
                   rank_student=z_rank, rank_target=effective_rank(target), rank_pred=effective_rank(pred),
                   std_student=mean_std(z), std_target=mean_std(target), std_pred=mean_std(pred),
                   intensity_share_student=share,
                   intensity_share_target=intensity_share(target, m_tgt, w_tgt),
                   teacher_moved=relative_distance(teacher.parameters(), teacher_init),
                   teacher_to_student=relative_distance(teacher.parameters(), raw_model.student.parameters()))
        if position_control:
            rec["loss_position_only"] = stats[1].item()
            # the same on what brightness does not explain (this batch): close together, the context
            # predicts nothing of the targets but how bright they are
            rec["loss_content"] = content_loss(pred, target, m_tgt, w_tgt)
            rec["loss_content_position_only"] = content_loss(pred_pos, target, m_tgt, w_tgt)
        mfu = f" mfu {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else ""
        ctl = (f" (positions only {rec['loss_position_only']:.4f}; beyond brightness {rec['loss_content']:.4f} vs "
               f"{rec['loss_content_position_only']:.4f})" if position_control else "")
        log(rec, f"step {step}: loss {rec['loss']:.4f}{ctl} lr {lr:.2e} mom {mom:.4f} | {rec['tokens_per_s']:.0f} tok/s "
                 f"{rec['volumes_per_s']:.1f} vol/s {rec['tflops']:.3f} TFLOP/s{mfu} | rank student {z_rank:.1f} "
                 f"target {rec['rank_target']:.1f} pred {rec['rank_pred']:.1f} | teacher moved "
                 f"{rec['teacher_moved']:.3f}")
        if warning and master:
            print(warning, flush=True)
        t_log, tok_log, vol_log, flops_log, loss_log, pos_log, n_log = time.time(), 0, 0, 0.0, 0.0, 0.0, 0
    if probes is not None and (step % eval_interval == 0 or step == max_steps):
        run_probes(step)
    if step % ckpt_interval == 0 or step == max_steps or stop:
        save_checkpoint(step)
        if master:
            save_encoders()
    if stop:
        if master:
            print(f"stop requested: checkpoint at step {step} in {ckpt_path}; resume with --init_from=resume")
        break

if ddp:
    dist.barrier()
    dist.destroy_process_group()
