"""The training loop behind ``python -m launch.train``: SFT or DPO, sharded, resumable.

Load -> mesh + shardings -> one jitted step -> loop with Orbax checkpoints (state, data
position, RNG) -> HF export and curves. A restarted run resumes from the newest checkpoint in
``checkpoint.dir`` that restores (checkpoints.py) by itself and replays exactly the batches an
uninterrupted run would see.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cosa_jax import distributed
from cosa_jax import sharding as shd
from cosa_jax.models import load_hf, load_tokenizer, save_hf
from cosa_jax import atomic_files
from cosa_jax.train import checkpoints as ckpt
from cosa_jax.train import config as tc
from cosa_jax.train import data as td
from cosa_jax.train import logprobs, losses, memory_plan, optim
from cosa_jax.train import step as ts
from cosa_jax.train.batches import Batch
from cosa_jax.train.metrics_log import MetricsLog, plot_curves



class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the state and checkpoints stay at the last good step."""


def _global_array(host: np.ndarray, sharding) -> jax.Array:
    """Every process builds the same host batch; each device takes only its shard."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


class Trainer:
    def __init__(self, config: ml_collections.ConfigDict):
        tc.validate(config)
        self.c = config
        distributed.initialize(config.distributed)
        self.is_main = jax.process_index() == 0
        self.out = Path(config.output_dir)
        self.ckpt_dir = Path(config.checkpoint.dir or self.out / "checkpoints").absolute()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_files.write_text(self.out / "config.json", config.to_json_best_effort(indent=2))
        self.mode = config.train.mode
        self.share_prompt = self.mode == "dpo" and config.dpo.share_prompt
        self.mesh = shd.make_mesh(tc.resolve_mesh_shape(config.mesh.shape, jax.device_count()))
        self._check_batch_fits_mesh()

        m = config.model
        self.model, self.mcfg = load_hf(m.path, dtype=m.param_dtype, compute_dtype=m.compute_dtype,
                                        mesh=self.mesh, attention_impl=m.attention_impl,
                                        remat=m.remat, scan_layers=m.scan_layers)
        self.tokenizer = load_tokenizer(m.path)
        self.pad_id = td.pad_id_for(self.tokenizer)
        # Fixed shapes compile once; buckets waste fewer FLOPs but compile once per bucket.
        self.pad_multiple = (config.data.max_length if config.data.fixed_length
                             else config.data.pad_multiple)
        data_kw = dict(truncation=config.data.truncation, max_length=config.data.max_length,
                       max_prompt_length=config.data.max_prompt_length,
                       max_target_length=config.data.max_target_length or None)
        self.train_examples = td.load_examples(self.tokenizer, config.data.train, mode=self.mode,
                                               split=config.data.train_split, **data_kw)
        self.eval_examples = []
        if config.data.eval:
            self.eval_examples = td.load_examples(self.tokenizer, config.data.eval, mode=self.mode,
                                                  split=config.data.eval_split, **data_kw)
            self.eval_examples = self.eval_examples[:config.data.eval_pairs]
        self.steps_per_epoch = td.batches_per_epoch(len(self.train_examples), config.train.batch_size)
        if self.steps_per_epoch == 0:
            raise td.DataError(f"{config.data.train}: {len(self.train_examples)} examples, fewer "
                               f"than one batch of train.batch_size={config.train.batch_size}")
        self.total_steps = (config.train.max_steps if config.train.max_steps > 0
                            else config.train.epochs * self.steps_per_epoch)

        t = config.train
        self.lr_schedule = optim.warmup_schedule(t.lr, t.warmup_steps, schedule=t.schedule,
                                                 total_steps=self.total_steps)
        self.tx = optim.make_optimizer(t.lr, t.warmup_steps, clip_norm=t.clip_norm or None,
                                       decay=t.rmsprop_decay, eps=t.rmsprop_eps,
                                       schedule=t.schedule, total_steps=self.total_steps,
                                       weight_decay=t.weight_decay)
        d = config.dpo
        reference_free = d.loss_type in losses.REFERENCE_FREE
        self.loss_cfg = ts.LossConfig(mode=self.mode, beta=d.beta,
                                      label_smoothing=d.label_smoothing, loss_type=d.loss_type,
                                      precomputed_ref=(self.mode == "dpo" and d.precompute_ref
                                                       and not reference_free),
                                      logps_chunk=t.logps_chunk,
                                      save_logits=bool(t.save_logits),
                                      simpo_beta=d.simpo_beta, simpo_gamma=d.simpo_gamma,
                                      orpo_lambda=d.orpo_lambda, margin_scale=d.margin_scale,
                                      grad_dtype=t.grad_dtype)
        self.score_gaps = {}
        if self.loss_cfg.needs_score_gap:
            self.score_gaps["train"] = self._score_gaps(config.data.train, config.data.train_split,
                                                        len(self.train_examples))
            if self.eval_examples:
                self.score_gaps["eval"] = self._score_gaps(
                    config.data.eval, config.data.eval_split, None)[:len(self.eval_examples)]

    # ------------------------------------------------------------------ setup pieces
    @staticmethod
    def _score_gaps(source, split, n_examples) -> np.ndarray:
        """rejected_category_error_score - chosen_category_error_score per pair, in the order
        the pairs were tokenised (one example per row in DPO mode)."""
        rows = td.load_preference_rows(source, split=split)
        if n_examples is not None and len(rows) != n_examples:
            raise td.DataError(f"{source}: {len(rows)} rows but {n_examples} tokenised pairs; "
                               f"dpo.loss_type='score_margin' needs one pair per row")
        return np.asarray([float(r["rejected_category_error_score"])
                           - float(r["chosen_category_error_score"]) for r in rows], np.float32)

    def _check_batch_fits_mesh(self):
        c = self.c
        two_rows = c.train.mode == "dpo" and not self.share_prompt
        rows = c.train.batch_size // c.train.grad_accum * (2 if two_rows else 1)
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if rows % ways:
            how = (" x 2 for DPO" if two_rows
                   else ", one prompt-shared row per pair" if c.train.mode == "dpo" else "")
            raise tc.TrainConfigError(
                f"config key train.batch_size: a micro-batch has {rows} sequences "
                f"(batch_size / grad_accum{how}), not divisible by data x fsdp = {ways} devices")

    def _init_state(self):
        params = self.model.params()
        shapes = jax.eval_shape(lambda p: ts.init_state(p, self.tx, self.c.seed), params)
        self.state_sh = ts.state_shardings(shapes, self.tx, self.mesh)
        self.ref_params = None
        if not self.loss_cfg.needs_reference:
            pass  # SFT, SimPO, ORPO: no reference model at all
        elif not self.loss_cfg.precomputed_ref:
            self.ref_params = jax.jit(lambda p: ts.reference_params(p, self.mcfg),
                                      out_shardings=self.state_sh["params"])(params)
        else:
            self._precompute_reference(params)
        init = jax.jit(lambda p: ts.init_state(p, self.tx, self.c.seed),
                       out_shardings=self.state_sh, donate_argnums=(0,))
        self.model = None  # its buffers were donated into the state
        return init(params), shapes

    def _ref_cache_path(self, examples, tag: str) -> Path:
        h = hashlib.sha256()
        h.update(json.dumps([self.c.model.path, self.c.model.compute_dtype, tag]).encode())
        for e in examples:
            h.update(np.asarray([*e.prompt_ids, -1, *e.response_ids[0], -2, *e.response_ids[1]],
                                np.int64).tobytes())
        return self.out / "ref_logps" / f"{tag}-{h.hexdigest()[:16]}.npy"

    def _precompute_reference(self, params):
        """Reference log-probs of every pair, once, cached on disk: the reference model need
        not sit in device memory during training."""
        self.ref_logps = {}
        # Replicated out: every process reads all rows (a batch-sharded result spans processes).
        fn = jax.jit(lambda p, b: logprobs.row_logps(p, self.mcfg, b, self.loss_cfg.logps_chunk),
                     out_shardings=shd.replicated(self.mesh))
        micro_pairs = self.c.train.batch_size // self.c.train.grad_accum
        for tag, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            if not examples:
                continue
            path = self._ref_cache_path(examples, tag)
            if path.exists():
                self.ref_logps[tag] = np.load(path)
                continue
            out = np.zeros((len(examples), 2), np.float32)
            for start in tqdm(range(0, len(examples), micro_pairs), desc=f"reference logps ({tag})",
                              disable=not self.is_main):
                idx = list(range(start, min(start + micro_pairs, len(examples))))
                idx += [idx[-1]] * (micro_pairs - len(idx))  # fixed shape: repeat the last pair
                batch = td.collate([examples[i] for i in idx], pad_id=self.pad_id,
                                   pad_multiple=self.pad_multiple,
                                   max_length=self.c.data.max_length,
                                   window_multiple=self._window_multiple())
                rows = batch.replace(index=None)
                dev = jax.tree.map(lambda x: _global_array(x, shd.batch_sharding(self.mesh, x.ndim)),
                                   rows)
                logps = np.asarray(jax.device_get(fn(params, dev)))
                out[idx, 0], out[idx, 1] = logps[:micro_pairs], logps[micro_pairs:]
            if self.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_files.atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, out)
            self.ref_logps[tag] = out

    def _response_budget(self) -> int:
        """Tokens of one response the reference truncation keeps when it cuts."""
        d = self.c.data
        return d.max_target_length or d.max_length - d.max_prompt_length

    def _shared_min_length(self) -> int:
        """With data.fixed_length, prompt-shared rows are padded to max_length plus one more
        response (max_target_length): every pair the reference truncation cut fits one shape."""
        d = self.c.data
        if not (self.share_prompt and d.fixed_length):
            return 0
        return d.max_length + self._response_budget()

    def _window_multiple(self) -> int:
        """Response windows (the positions that meet the vocabulary) come in multiples of one
        truncated response per row (two in a prompt-shared row) under data.fixed_length, so a
        run compiles a few shapes (at most T / that); else in multiples of data.pad_multiple."""
        d = self.c.data
        if not d.fixed_length:
            return d.pad_multiple
        multiple = self._response_budget() * (2 if self.share_prompt else 1)
        return multiple if multiple > 0 else d.pad_multiple

    def _collate(self, examples, idx) -> Batch:
        if self.share_prompt:
            return td.collate_prompt_shared(examples, pad_id=self.pad_id,
                                            pad_multiple=self.c.data.pad_multiple,
                                            min_length=self._shared_min_length(),
                                            window_multiple=self._window_multiple(), indices=idx)
        return td.collate(examples, pad_id=self.pad_id, pad_multiple=self.pad_multiple,
                          max_length=self.c.data.max_length,
                          window_multiple=self._window_multiple(), indices=idx)

    def _device_batch(self, batch: Batch, tag: str = "train", grad_accum: int | None = None):
        grad_accum = grad_accum or self.c.train.grad_accum
        per_pair = {}
        if self.loss_cfg.precomputed_ref:
            ref = self.ref_logps[tag][batch.index]
            per_pair.update(ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1])
        if self.loss_cfg.needs_score_gap:
            per_pair["pair_score_gap"] = self.score_gaps[tag][batch.index]
        # Per-pair values split [pairs] -> [grad_accum, pairs/grad_accum] like the pairs' rows.
        host = ts.to_micro_batches(batch.replace(**per_pair), grad_accum)
        return jax.tree.map(_global_array, host, ts.batch_shardings(host, self.mesh))

    def _log(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def _check_memory(self, train_step, state, device_batch) -> memory_plan.MemoryPlan:
        """Compile the step (jit's cache keeps it for the first call) and refuse a plan that
        cannot fit, before the first step allocates."""
        compiled = train_step.lower(state, self.ref_params, device_batch).compile()
        plan = memory_plan.from_compiled(compiled, jax.local_devices()[0],
                                         self.c.train.device_memory_gb)
        if self.is_main:
            print(plan.report(), flush=True)
        memory_plan.check(plan, self.c)
        return plan

    def _checkpoint_manager(self):
        return ckpt.make_manager(self.ckpt_dir, keep=self.c.checkpoint.keep,
                                 async_save=self.c.checkpoint.async_save, log=self._log)

    def _evaluate(self, params) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        if not hasattr(self, "_eval_fn"):
            self._eval_fn = jax.jit(lambda p, r, b: ts.loss_and_metrics(
                p, r, jax.tree.map(lambda x: x[0], b), self.mcfg, self.loss_cfg)[1],
                out_shardings=shd.replicated(self.mesh))
        micro = self.c.train.batch_size // self.c.train.grad_accum
        n = len(self.eval_examples)
        totals, count = {}, 0
        for start in range(0, n - micro + 1, micro):  # whole micro-batches only: one shape
            idx = list(range(start, start + micro))
            batch = self._collate([self.eval_examples[i] for i in idx], idx)
            metrics = jax.device_get(self._eval_fn(params, self.ref_params,
                                                   self._device_batch(batch, "eval", grad_accum=1)))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
        return {f"eval/{k}": v / count for k, v in totals.items()} if count else {}

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        state, shapes = self._init_state()
        manager = self._checkpoint_manager()
        position = td.DataPosition()
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, self.state_sh)
        restored = ckpt.restore_newest(manager, abstract, log=self._log)
        if restored is not None:
            state, position = restored.state, restored.position
            # every process says so: on a multi-host run each host's log shows its own resume
            print(f"[cosa-jax] resumed from {self.ckpt_dir} at step {restored.step} "
                  f"(epoch {position.epoch}, example {position.index})", flush=True)
        step = int(jax.device_get(state["step"]))
        metrics_log = MetricsLog(self.out, resume_step=step, enabled=self.is_main)

        batches = td.iterate_batches(self.train_examples, batch_size=self.c.train.batch_size,
                                     pad_id=self.pad_id, seed=self.c.seed, start=position,
                                     shuffle=self.c.train.shuffle, collate_fn=self._collate)
        first_batch, first_pos = next(batches)
        first_dev = self._device_batch(first_batch)
        train_step = ts.jit_train_step(
            ts.make_train_step(self.mcfg, self.loss_cfg, self.tx, self.lr_schedule), self.mesh,
            self.state_sh, first_dev, with_ref=self.ref_params is not None)
        try:
            self.memory_plan = self._check_memory(train_step, state, first_dev)
        except memory_plan.MemoryPlanError:
            manager.close()
            raise

        def save(step_, position_):
            ckpt.save(manager, step_, state, position_, self.c.seed)

        bar = tqdm(total=self.total_steps, initial=step, desc=f"{self.mode}", disable=not self.is_main,
                   dynamic_ncols=True)
        last_metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        pending = [(first_batch, first_pos)]
        try:
            while step < self.total_steps:
                batch, position = pending.pop() if pending else next(batches)
                t0 = time.perf_counter()
                state, metrics = train_step(state, self.ref_params, self._device_batch(batch))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                if metrics.pop("nonfinite"):
                    manager.wait_until_finished()
                    raise TrainingDiverged(
                        f"non-finite loss or gradient at step {step + 1} (loss={metrics['loss']}, "
                        f"grad_norm={metrics['grad_norm']}); the update was skipped and the "
                        f"newest checkpoint is step {manager.latest_step()} in {self.ckpt_dir}")
                step += 1
                metrics["tokens_per_sec"] = float(batch.attention_mask.sum()) / dt
                last_metrics = metrics
                if self.c.train.eval_every and step % self.c.train.eval_every == 0:
                    eval_metrics = self._evaluate(state["params"])
                    metrics.update(eval_metrics)
                if step % self.c.train.log_every == 0 or step == self.total_steps:
                    metrics_log.write(step, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_sec']:.0f}")
                if self.c.checkpoint.every and step % self.c.checkpoint.every == 0:
                    save(step, position)
            if manager.latest_step() != step:
                save(step, position)
            if not self.c.train.eval_every or step % self.c.train.eval_every:
                eval_metrics = self._evaluate(state["params"])
                if eval_metrics:  # not logged again if a kill came after it was logged
                    metrics_log.write(step, eval_metrics)
            manager.wait_until_finished()
        finally:
            bar.close()
            metrics_log.close()
            manager.close()
        hf_dir = Path(self.c.export.hf_dir or self.out / "hf")
        with atomic_files.atomic_directory(hf_dir, writer=self.is_main) as partial:
            save_hf(state["params"], self.mcfg, partial, self.tokenizer,
                    dtype=self.c.export.dtype or None)
        png = plot_curves(self.out / "metrics.jsonl", self.out / "curves.png",
                          title=f"{self.mode} on {self.c.data.train}") if self.is_main else None
        return {"step": step, "train": last_metrics, "eval": eval_metrics, "hf_dir": str(hf_dir),
                "curves": str(png) if png else None, "output_dir": str(self.out)}


def train(config: ml_collections.ConfigDict) -> dict:
    return Trainer(config).run()
