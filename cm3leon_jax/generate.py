"""Generation with a trained CM3Leon: text -> image, image -> text, infilling.

    python -m cm3leon_jax.generate --workdir DIR --prompt "a small red circle at the top left" \
        --num_samples 8 --cfg_scale 3 --top_p 0.9 [--cd_fraction 0.5] [--neighbours 2] --out DIR/gen
    python -m cm3leon_jax.generate --workdir DIR --image photo.png [--question "what colour is the circle?"]
    python -m cm3leon_jax.generate --workdir DIR --prompt "a <mask:0> circle at the top left"
    python -m cm3leon_jax.generate --workdir SFT_DIR --task edit --image in.png --prompt "make the circle blue"
        (instruction-tuned tasks: cm3leon_jax/sft_generate.py)
    python -m cm3leon_jax.generate --workdir DIR --prompts_file captions.txt --num_samples 1 --out DIR/coco
        (one PNG per sample, for FID and the like; resumable, shardable over processes)

Loads the latest checkpoint's parameters, the vocabulary saved beside them, the VQ tokenizer the
data was made with and, when the data has them, the retriever and its ScaNN index (for
retrieval-augmented prompts and CLIP-style reranking; `--clip_model DIR` reranks with a local
Hugging Face CLIP checkpoint instead, as the paper does). Writes a PNG grid and a JSON of
settings and scores.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import ml_collections
import numpy as np
from absl import logging

from cm3leon_jax import decoding, export, image_grid, sampling, sharding, trainer as trainer_lib
from cm3leon_jax import vocab as vocab_lib, vqgan, workdir_io

MASK0 = vocab_lib.sentinel_token(0)


@dataclasses.dataclass
class ImageSamples:
    caption: str
    images: np.ndarray       # uint8 [N, H, W, 3], best first when reranked
    codes: np.ndarray        # int32 [N, h, w]
    strategies: list[str]    # per sample: "topp" or "cdk"
    logprobs: np.ndarray     # [N] the conditional stream's log-probability of the drawn codes
    scores: np.ndarray | None = None  # [N] reranker similarity to the caption (CLIP's or the retriever's)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def cd_sample_count(cd_fraction: float, num_samples: int) -> int:
    """How many of `num_samples` the CD-K share draws: rounded half up, so 0.5 of 1, 3 or 5 samples
    gives CD-K 1, 2 or 3 (Python's round gave 0, 2, 2: a half went to either side by parity)."""
    return int(math.floor(cd_fraction * num_samples + 0.5))


class Generator:
    """Everything needed to decode from one training workdir or params bundle, loaded once."""

    def __init__(self, workdir: str, *, step: int | None = None, vq_workdir: str | None = None,
                 data_dir: str | None = None, mesh_config=None, clip_model: str | None = None, int8: bool = False,
                 compute_dtype: str | None = None):
        """`workdir`: a training workdir or a params bundle (export --format params, verified on
        load; it carries its VQ tokenizer). `data_dir` (retriever, ScaNN index, VQ tokenizer of
        a workdir) defaults to the config's; "" for none. `clip_model`: a local Hugging Face CLIP
        checkpoint that reranks text -> image samples (the paper's reranker) instead of the
        retriever (`clip_metrics.ClipScorer`). `int8`: decode with int8 weight-only kernels
        (`quantization.quantize_params`: a quarter of the weight memory). `compute_dtype`: the
        activations' and KV cache's dtype for decoding (e.g. "bfloat16" on an accelerator; default:
        the training config's)."""
        from cm3leon_jax import retriever
        self.config = export.read_config(workdir)
        if compute_dtype:
            if compute_dtype not in COMPUTE_DTYPES:
                raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
            self.config.model.dtype = compute_dtype
        self.data_dir = self.config.data.get("data_dir", "") if data_dir is None else data_dir
        # a data dir whose bank a user's CLIP embedded: queries (and, by default, reranking) use that CLIP;
        # the index's record of its embedder says whether a CLIP reference left there is the current one
        from data_pipeline import neighbours
        self._embedder_kind = (neighbours.index_embedder(self.data_dir) or {}).get("kind")
        self._clip_reference = (retriever.load_clip_reference(self.data_dir)
                                if self._embedder_kind in (None, "clip") else None)
        clip_model = clip_model or (self._clip_reference or {}).get("clip_model")
        self.clip_scorer = None
        if clip_model:  # a bad checkpoint fails before the LM loads
            from cm3leon_jax import clip_metrics
            self.clip_scorer = clip_metrics.ClipScorer(clip_model)
        if mesh_config is None:
            mesh_config = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
        self.mesh = sharding.make_mesh(mesh_config)
        self.trainer = trainer_lib.Trainer(self.config, self.mesh)
        self.model_config = self.trainer.model_config
        if self.model_config.lora_rank:   # LoRA adapters folded into the kernels: decoding pays nothing for them
            params, self.step = trainer_lib.restore_run_params(workdir, self.config, self.mesh, step)
            self.config, self.model_config, self.params = export.merge_adapters(self.config, params, self.mesh)
            self.trainer = trainer_lib.Trainer(self.config, self.mesh)
        else:
            self.params, self.step = export.restore_params(workdir, self.trainer.abstract_state.params, step)
        if int8:
            from cm3leon_jax import quantization
            self.params = quantization.quantize_params(self.params)
        self.vocab = vocab_lib.Vocabulary.load(workdir_io.join(workdir, "vocab"))
        self.vq, vq_workdir = export.load_vq_tokenizer(workdir, vq_workdir, self.data_dir)
        self.vq_workdir, self.int8 = vq_workdir, bool(int8)
        export.check_vq_fits_vocab(self.vq, self.vocab, vq_workdir)
        self._retriever = None
        self._retrieval = None

    # ------------------------------------------------------------ data-side helpers

    @property
    def retriever(self):
        """(params, config) of the data's trained retriever, or None when the data has none."""
        from cm3leon_jax import retriever
        if self._retriever is None and self.data_dir and os.path.exists(
                os.path.join(self.data_dir, retriever.RETRIEVER_SUBDIR, retriever.CONFIG_JSON)):
            self._retriever = retriever.load_retriever(self.data_dir)
        return self._retriever

    def retrieve(self, caption: str, k: int) -> list[np.ndarray]:
        """The k memory-bank documents chosen for a caption (ScaNN over the data's bank, then the
        training pipeline's rules: no near duplicates, multimodal first, diverse), as tokens."""
        return self._retrieve("text", caption, k)

    def retrieve_for_image(self, codes: np.ndarray, k: int) -> list[np.ndarray]:
        """The same for an image (its VQ codes) as the query: image -> text with retrieval."""
        return self._retrieve("image", np.asarray(codes), k)

    def _retrieve(self, modality: str, query, k: int) -> list[np.ndarray]:
        if k <= 0:
            return []
        if not self.can_retrieve:
            why = ("its index was built from --embeddings, which come with no query encoder: rebuild it with the "
                   "retriever or --clip_model" if self._embedder_kind == "embeddings" else
                   "a params bundle carries none: pass --data_dir")
            raise ValueError(f"--neighbours={k} needs a retriever and index in the data dir {self.data_dir!r} ({why})")
        from cm3leon_jax import clip_metrics, retriever
        from data_pipeline import index as index_lib, neighbours, prepare
        if self._retrieval is None:
            documents = prepare.load_documents(self.data_dir, "train")
            texts, images = index_lib.document_columns(documents, self.vocab.image_tokens_per_image)
            if self._clip_reference is not None:  # the bank as the retrieval stage embedded it
                bank = np.load(self._clip_reference["embeddings"])
                scorer = self.clip_scorer
                if scorer.model_dir != os.path.abspath(self._clip_reference["clip_model"]):  # reranking uses another
                    scorer = clip_metrics.ClipScorer(self._clip_reference["clip_model"])
                embed = {"text": lambda caption: scorer.embed_text([caption]),
                         "image": lambda codes: scorer.embed_images(self.vq.decode(codes[None]))}
            else:
                params, rcfg = self.retriever
                bank = retriever.embed_documents(params, rcfg, texts, images)
                embed = {"text": lambda caption: retriever.embed_text(params, rcfg, [self.vocab.encode_text(caption)]),
                         "image": lambda codes: retriever.embed_images(params, rcfg, [codes.reshape(-1)])}
            multimodal = np.array([len(t) > 0 and len(c) > 0 for t, c in zip(texts, images)])
            self._retrieval = (neighbours.load_index(os.path.join(self.data_dir, "scann_index")), documents, bank,
                               multimodal, embed)
        index, documents, bank, multimodal, embed = self._retrieval
        ids, _ = neighbours.neighbours_of_queries(index, embed[modality](query), k, bank, multimodal)
        return [np.asarray(documents[int(i)]["tokens"], np.int32) for i in ids[0] if i >= 0]

    @property
    def can_rerank(self) -> bool:
        return self.clip_scorer is not None or self.retriever is not None

    @property
    def can_retrieve(self) -> bool:
        if self._embedder_kind == "embeddings":   # a user's vectors: nothing embeds a new query like them
            return False
        return self._clip_reference is not None or self.retriever is not None

    def rerank_scores(self, caption: str, codes: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        """Cosine similarity of each image to the caption: under the user's CLIP when given (of the
        decoded `images`, decoded from `codes` if None), else under the retriever (our CLIP stand-in)."""
        return self.rerank_scores_many([caption], [codes], [images])[0]

    def rerank_scores_many(self, captions: Sequence[str], codes: Sequence[np.ndarray],
                           images: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """`rerank_scores` of each caption's samples. Under the retriever, every caption's texts and
        images are embedded in one call each: a call pads its rows to retriever.embed_batch_size
        (256), so embedding 8 samples a caption cost as much as 256 (the same numbers either way)."""
        if self.clip_scorer is not None:
            clip = self.clip_scorer
            return [clip.embed_images(self.vq.decode(grids) if decoded is None else decoded)
                    @ clip.embed_text([caption])[0] for caption, grids, decoded in zip(captions, codes, images)]
        from cm3leon_jax import retriever
        params, rcfg = self.retriever
        texts = retriever.embed_text(params, rcfg, [self.vocab.encode_text(caption) for caption in captions])
        embedded = retriever.embed_images(params, rcfg, [c.reshape(-1) for grids in codes for c in grids])
        ends = np.cumsum([len(grids) for grids in codes])
        return [embedded[end - len(grids):end] @ text for grids, end, text in zip(codes, ends, texts)]

    # ------------------------------------------------------------ decoding

    def _decode_fixed(self, streams_prompts, num_tokens, config, allowed, seed, ids=None):
        """`ids`: each prompt's key ids (`decoding.prompt_keys`; default its index)."""
        tokens, mask = decoding.stream_rows(streams_prompts, multiple=sharding.data_parallel_size(self.mesh))
        decoding.check_fits(self.model_config, int(mask.sum(1).max()), num_tokens)
        n = len(streams_prompts[0])
        keys = decoding.prompt_keys(seed, [[i] for i in range(n)] if ids is None else ids,
                                    tokens.shape[0] // len(streams_prompts))
        with sharding.activate(self.mesh):
            out, logprobs = decoding.generate_fixed(
                self.params, tokens, mask, keys, model_config=self.model_config,
                streams=len(streams_prompts), num_tokens=num_tokens, config=config, allowed=allowed)
        return np.asarray(out)[:n], np.asarray(logprobs)[:n]

    def image_prompt(self, caption: str, neighbour_docs: Sequence[np.ndarray] = ()) -> list[int]:
        """`<eos> neighbours caption <break>`: the model continues with the image's codes."""
        body = [int(t) for doc in neighbour_docs for t in doc]
        return [self.vocab.eos_id, *body, *self.vocab.encode_text(caption).tolist(), self.vocab.break_id]

    def unconditional_image_prompt(self) -> list[int]:
        """The null condition the model saw under condition dropout: `<eos> <mask> <break>`."""
        return [self.vocab.eos_id, self.vocab.mask_id, self.vocab.break_id]

    def text_to_image(self, captions: Sequence[str], *, num_samples: int = 8,
                      config: sampling.SamplingConfig = sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0),
                      cd_fraction: float = 0.0, cd_config: sampling.SamplingConfig | None = None,
                      num_neighbours: int = 0, rerank: bool = True, seed: int = 0, batch_size: int = 16,
                      indices: Sequence[int] | None = None) -> list[ImageSamples]:
        """num_samples images per caption; a `cd_fraction` of them by CD-K, the rest by `config`
        (the paper's best: half TopP, half CD-K, reranked). `cd_config` draws the CD-K share (default:
        CD-K with `sampling.DEFAULT_CD_K` at `config`'s temperature). Every caption's samples of a
        strategy are decoded together, `batch_size` images per call (with their guidance streams).
        Sample j of caption i by strategy s is drawn with its own key, (seed, indices[i], s, j), so
        it does not depend on batch_size or on the other captions of the call (`indices`: the
        captions' places in a longer list, as in `generate_many`; default 0, 1, ...)."""
        self.vq.require_decoder()  # before any sampling: an encoder-only (imported) VQ cannot show images
        if isinstance(captions, str):   # else each character would be drawn as a caption
            raise TypeError("text_to_image takes a list of captions")
        captions = [vocab_lib.prompt_text(c, f"caption {i}") for i, c in enumerate(captions)]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        indices = list(range(len(captions))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(captions):
            raise ValueError(f"{len(indices)} indices for {len(captions)} captions")
        if num_samples < 1 or not 0.0 <= cd_fraction <= 1.0:
            raise ValueError(f"need num_samples >= 1 and cd_fraction in [0, 1]; got {num_samples}, {cd_fraction}")
        n_cd = cd_sample_count(cd_fraction, num_samples)
        # a `config` with cd_k > 0 draws by CD-K too (`--cd_k` without --cd_fraction): label it so
        plans = [("cdk" if config.cd_k > 0 else "topp", num_samples - n_cd, config)]
        if n_cd:
            plans.append(("cdk", n_cd, cd_config or sampling.SamplingConfig(temperature=config.temperature,
                                                                             cd_k=sampling.DEFAULT_CD_K)))
        image_range = ((self.vocab.image_offset, self.vocab.image_offset + self.vocab.num_image_codes),)
        h, w = self.vocab.image_grid
        conds = [self.image_prompt(c, self.retrieve(c, num_neighbours)) for c in captions]
        codes = [[] for _ in captions]
        logprobs = [[] for _ in captions]
        strategies = [[] for _ in captions]
        for p_index, (name, count, cfg) in enumerate(plans):
            guided = cfg.cfg_scale != 1.0 or cfg.cd_k > 0
            rows = [(i, j) for i in range(len(captions)) for j in range(count)]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                streams = [[conds[i] for i, _ in chunk]]
                if guided:
                    streams.append([self.unconditional_image_prompt()] * len(chunk))
                out, lp = self._decode_fixed(streams, self.vocab.image_tokens_per_image, cfg, image_range, seed,
                                             ids=[(indices[i], p_index, j) for i, j in chunk])
                for (i, _), c, l in zip(chunk, out, lp):
                    codes[i].append(c - self.vocab.image_offset)
                    logprobs[i].append(l.sum())
                    strategies[i].append(name)
        grids = [np.stack(c).reshape(-1, h, w).astype(np.int32) for c in codes]
        # one VQ call for every caption: each call pads to the tokenizer's batch_size (64 images)
        images, ends = self.vq.decode(np.concatenate(grids)), np.cumsum([len(g) for g in grids])
        results = [ImageSamples(caption, images[end - len(g):end], g, names, np.asarray(lp, np.float32))
                   for caption, g, end, lp, names in zip(captions, grids, ends, logprobs, strategies)]
        if rerank and self.can_rerank:
            scores = self.rerank_scores_many([s.caption for s in results], [s.codes for s in results],
                                             [s.images for s in results])
            for k, (s, s_scores) in enumerate(zip(results, scores)):
                order = np.argsort(-s_scores, kind="stable")
                results[k] = ImageSamples(s.caption, s.images[order], s.codes[order], [s.strategies[j] for j in order],
                                          s.logprobs[order], s_scores[order])
        return results

    def _infill(self, prompts: Sequence[list[int]], max_tokens: int, config: sampling.SamplingConfig,
                seed: int) -> list[str]:
        """Each prompt holds `<mask:0>`; the model writes the span after `<eos> <mask:0>` (the CM3
        layout) until `<eoss>`, drawing only text ids."""
        s0 = self.vocab.sentinel(0)
        rows = [[*p, self.vocab.eos_id, s0] for p in prompts]
        allowed = ((self.vocab.eoss_id, self.vocab.eoss_id + 1), *self.vocab.emittable_text_ranges())
        texts = []
        for ids in self._decode_until(rows, (self.vocab.eoss_id,), max_tokens, config, allowed, seed):
            ids = [t for t in ids if t != self.vocab.eoss_id]
            texts.append(self.vocab.decode_text(np.asarray(ids, np.int32)))
        return texts

    def _decode_until(self, prompts: Sequence[list[int]], stop_ids: tuple[int, ...], max_tokens: int,
                      config: sampling.SamplingConfig, allowed, seed: int) -> list[list[int]]:
        """Each prompt's continuation (one stream), up to and including the first of `stop_ids`."""
        tokens, mask = decoding.stream_rows([list(prompts)], multiple=sharding.data_parallel_size(self.mesh))
        decoding.check_fits(self.model_config, int(mask.sum(1).max()), max_tokens)
        keys = decoding.prompt_keys(seed, [[i] for i in range(len(prompts))], tokens.shape[0])
        with sharding.activate(self.mesh):
            out, lengths = decoding.generate_until(
                self.params, tokens, mask, keys, stop_ids, model_config=self.model_config,
                streams=1, max_tokens=max_tokens, config=config, allowed=allowed)
        return [[int(t) for t in row[:n]] for row, n in zip(np.asarray(out)[:len(prompts)],
                                                            np.asarray(lengths)[:len(prompts)])]

    def interleaved(self, prompts: Sequence[str], *, num_samples: int = 1, max_images: int = 2,
                    max_text_tokens: int = 48,
                    text_config: sampling.SamplingConfig = sampling.SamplingConfig(temperature=0.0),
                    image_config: sampling.SamplingConfig = sampling.SamplingConfig(top_p=0.9),
                    image_first: bool = True, seed: int = 0, batch_size: int | None = None) -> list[dict]:
        """Mixed-modal continuations (Chameleon's interleaved generation) of `<eos> prompt`,
        `num_samples` documents per prompt, `batch_size` documents drawn together (default all:
        `decoding.generate_interleaved`, one prefill, one compiled loop per batch; document j of
        prompt i is drawn with its own key, (seed, i, j), so batching changes nothing). The model writes text (text ids, `<break>` or `<eos>` only)
        until it opens an image with `<break>`; then exactly one image's codes are drawn from the
        image ids and closed with `<break>`, and text resumes; a document ends at `<eos>`, at a
        `<break>` once `max_images` images are drawn (text may run on until then), or when a text
        phase fills `max_text_tokens`. A `<break>` opens an image only after text (a choice: the
        shapes and caption data never hold two images in a row). `image_first`:
        the prompt is followed by `<break>` at once, as in text_to_image. No CFG: training defines no
        unconditional stream for a mid-document image. Returns, prompt-major, {"prompt", "parts": str
        or [h, w] codes in order, "images": uint8 [n, H, W, 3], "tokens": the whole document}."""
        v = self.vocab
        self.vq.require_decoder()
        if isinstance(prompts, str):
            raise TypeError("interleaved takes a list of prompts")
        if not prompts:
            raise ValueError("interleaved generation needs text prompts")
        prompts = [vocab_lib.prompt_text(p, f"prompt {i}") for i, p in enumerate(prompts)]
        if num_samples < 1 or max_images < 0 or max_text_tokens < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"need num_samples >= 1, max_images >= 0, max_text_tokens >= 1, batch_size >= 1; got "
                             f"{num_samples}, {max_images}, {max_text_tokens}, {batch_size}")
        for name, c in (("text_config", text_config), ("image_config", image_config)):
            if c.cfg_scale != 1.0 or c.image_cfg_scale != 1.0 or c.cd_k > 0:   # one stream: they were dropped unread
                raise ValueError(f"interleaved generation draws one stream, without guidance or CD-K: {name} has "
                                 f"cfg_scale={c.cfg_scale}, image_cfg_scale={c.image_cfg_scale}, cd_k={c.cd_k}")
        in_image = image_first and max_images > 0
        rows = [[v.eos_id, *v.encode_text(p).tolist(), *([v.break_id] if in_image else [])]
                for p in prompts for _ in range(num_samples)]
        rules = decoding.InterleaveRules(break_id=v.break_id, eos_id=v.eos_id, image_tokens=v.image_tokens_per_image,
                                         max_images=max_images, max_text_tokens=max_text_tokens)
        decoding.check_fits(self.model_config, max(len(r) for r in rows), rules.budget())   # before any is drawn
        ids = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
        step = batch_size or len(rows)
        drawn = []
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            tokens, mask = decoding.stream_rows([chunk], multiple=sharding.data_parallel_size(self.mesh))
            keys = decoding.prompt_keys(seed, ids[start:start + step], tokens.shape[0])
            with sharding.activate(self.mesh):
                out, lengths = decoding.generate_interleaved(
                    self.params, tokens, mask, keys, model_config=self.model_config, rules=rules,
                    text_config=text_config, image_config=image_config,
                    text_allowed=(*v.emittable_text_ranges(), (v.break_id, v.break_id + 1), (v.eos_id, v.eos_id + 1)),
                    image_allowed=((v.image_offset, v.image_offset + v.num_image_codes),), in_image=in_image)
            # (rows past the chunk's pad the call to the data-parallel size)
            drawn += list(zip(np.asarray(out)[:len(chunk)], np.asarray(lengths)[:len(chunk)]))
        documents = []
        for i, (row, (new, n)) in enumerate(zip(rows, drawn)):
            doc = [*row, *new[:n].tolist()]
            parts = v.decode_document(np.asarray(doc[1:], np.int32))
            codes = [p for p in parts if not isinstance(p, str)]
            images = (self.vq.decode(np.stack(codes)) if codes else
                      np.zeros((0, self.vq.image_size, self.vq.image_size, 3), np.uint8))
            documents.append({"prompt": prompts[i // num_samples], "parts": parts, "images": images, "tokens": doc})
        return documents

    def caption_prompt(self, codes: np.ndarray, neighbour_docs: Sequence[np.ndarray] = (),
                       question: str | None = None) -> list[int]:
        """`<eos> neighbours [Question: q Answer:] <mask:0> <break> image <break>`: the model writes
        the masked text after `<eos> <mask:0>`."""
        body = [int(t) for doc in neighbour_docs for t in doc]
        question = vocab_lib.prompt_text(question, "the question") if question else None
        prefix = self.vocab.encode_text(f"Question: {question} Answer: ").tolist() if question else []
        return [self.vocab.eos_id, *body, *prefix, self.vocab.sentinel(0), self.vocab.break_id,
                *self.vocab.image_codes_to_ids(np.asarray(codes).reshape(-1)).tolist(), self.vocab.break_id]

    def image_to_text(self, images: np.ndarray, *, question: str | None = None, max_tokens: int = 48,
                      config: sampling.SamplingConfig = sampling.SamplingConfig(temperature=0.0),
                      seed: int = 0, num_neighbours: int = 0) -> list[str]:
        """Captions (or answers) for uint8 images [N, H, W, 3], by CM3 infilling of the text part:
        `<eos> [neighbours] [Question: q Answer:] <mask:0> <break> image <break>`; `num_neighbours`
        bank documents retrieved by each image come first, as in training."""
        images = np.asarray(images, np.uint8)
        if images.ndim != 4:   # the VQ would encode one [H, W, 3] image to [h, w] codes: h "images" of w codes
            raise ValueError(f"image_to_text takes a batch of images [N, H, W, 3], got {images.shape}; "
                             "for one image pass image[None]")
        codes = self.vq.encode(images)
        return self.caption_codes(codes, [self.retrieve_for_image(c, num_neighbours) for c in codes],
                                  question=question, max_tokens=max_tokens, config=config, seed=seed)

    def caption_codes(self, codes: np.ndarray, neighbour_docs: Sequence[Sequence[np.ndarray]], *,
                      question: str | None = None, max_tokens: int = 48,
                      config: sampling.SamplingConfig = sampling.SamplingConfig(temperature=0.0),
                      seed: int = 0) -> list[str]:
        """`image_to_text` for images already encoded ([N, h, w] codes), each with its retrieved
        documents (empty lists for none): a caller that also uses the documents retrieves once."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != tuple(self.vocab.image_grid):
            raise ValueError(f"caption_codes takes code grids [N, {', '.join(map(str, self.vocab.image_grid))}], got "
                             f"{codes.shape}; for one image pass codes[None]")
        if len(neighbour_docs) != len(codes):   # zip would drop the images past the shorter list
            raise ValueError(f"{len(neighbour_docs)} lists of documents for {len(codes)} images")
        if not len(codes):
            return []
        prompts = [self.caption_prompt(c, docs, question) for c, docs in zip(codes, neighbour_docs)]
        return self._infill(prompts, max_tokens, config, seed)

    def infill_text(self, text_with_mask: str, *, max_tokens: int = 32,
                    config: sampling.SamplingConfig = sampling.SamplingConfig(temperature=0.0), seed: int = 0) -> str:
        """Fills `<mask:0>` in a text prompt (e.g. "a <mask:0> circle at the top left")."""
        if MASK0 not in text_with_mask:
            raise ValueError(f"an infilling prompt needs {MASK0}")
        prompt = [self.vocab.eos_id, *self.vocab.encode_text(text_with_mask).tolist()]
        return self._infill([prompt], max_tokens, config, seed)[0]


def write_interleaved(gen: Generator, prompts: Sequence[str], out_dir: str, settings: dict, **kwargs) -> str:
    """Every interleaved document (`num_samples` per prompt): printed with [image k] markers, its
    images as one PNG row per document (interleaved.png) and its parts in interleaved.json."""
    documents = gen.interleaved(prompts, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    rows = [list(d["images"]) for d in documents]   # row i = document i (blank if it has no image)
    png = image_grid.save_png(os.path.join(out_dir, "interleaved.png"), image_grid.make_grid(rows)) if any(rows) else None
    if png is None and os.path.exists(os.path.join(out_dir, "interleaved.png")):
        os.remove(os.path.join(out_dir, "interleaved.png"))   # an earlier run's grid, beside documents it does not show
    record = {"settings": settings, "documents": []}
    for doc in documents:
        k, parts = 0, []
        for part in doc["parts"]:
            if isinstance(part, str):
                parts.append({"text": part})
            else:
                parts.append({"image": k, "codes": part.tolist()})
                k += 1
        record["documents"].append({"prompt": doc["prompt"], "parts": parts})
        print(" ".join(p["text"] if "text" in p else f"[image {p['image']}]" for p in parts))
    path = os.path.join(out_dir, "interleaved.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return png or path


def read_prompts_file(path: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """Captions for `generate --prompts_file`: a .txt file (one per line) or .jsonl (a "caption" or
    "text" field per line). Returns ([(line index, caption)], skipped counts by reason): an empty
    or malformed line is skipped and counted, never silently; its index is not reused, so output
    i always belongs to line i. A file that is not UTF-8, or holds no caption, is refused."""
    try:
        with open(path, encoding="utf-8") as f:   # universal newlines: \r\n and \r read as \n
            # lines end at \n only: splitlines() also breaks at \x0c, \x85, U+2028 ... inside a caption (or a
            # JSON string), which shifted every later caption's index off its line
            lines = f.read().split("\n")
        if lines[-1] == "":
            lines.pop()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts_file {path} is not UTF-8 text ({e})") from None
    jsonl = path.endswith(".jsonl")
    prompts, skipped = [], {}
    for index, line in enumerate(lines):
        caption, reason = line, None
        if jsonl:
            try:
                row = json.loads(line) if line.strip() else {}
                caption = row.get("caption", row.get("text", "")) if isinstance(row, dict) else None
            except json.JSONDecodeError:
                caption, reason = None, "malformed_json"
            if caption is not None and not isinstance(caption, str):
                caption, reason = None, "caption_not_a_string"
            elif caption is None and reason is None:
                reason = "malformed_json"
        if reason is None:   # as ingestion stores captions, and skipped as it skips them
            caption, reason = vocab_lib.stored_text(caption)
        if reason is None:
            prompts.append((index, caption))
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    if not prompts:
        raise ValueError(f"--prompts_file {path} holds no caption ({len(lines)} lines, skipped {skipped})")
    return prompts, skipped


# settings a resumed generate_many may change: they change no image (batching is free, skipped lines are counts)
RESUME_FREE_SETTINGS = ("batch_size", "skipped_lines")


def generate_many(gen: Generator, prompts: Sequence[tuple[int, str]], out_dir: str, settings: dict, *,
                  batch_size: int = 16, num_shards: int = 1, shard_index: int = 0, **kwargs) -> dict:
    """Text -> image for a long list of captions (e.g. 30,000 for a zero-shot FID): every caption's
    samples as `images/{index:06d}_{k}.png` (k = 0 best when reranked) and one `manifest*.jsonl`
    line (caption, files, strategies, log-probabilities, scores). Resumable: captions already in a
    manifest with all their files are skipped; a caption's images depend only on the seed and its
    index (`text_to_image(indices=)`), so a resumed or resharded run writes what an
    uninterrupted one would; a rerun whose `settings` differ (but for RESUME_FREE_SETTINGS) from those
    recorded beside samples already drawn is refused, so one directory never mixes two settings
    (or two checkpoints: the CLI's settings name the step). Shard `shard_index` of `num_shards` (one per process or host) takes
    the captions whose index is `shard_index` mod `num_shards`. Logs progress with an ETA."""
    import time
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} must be in [0, num_shards={num_shards})")
    num_samples = kwargs.get("num_samples", 8)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    from cm3leon_jax import clip_metrics
    # index -> the caption its samples were drawn for (a line cut by a kill is skipped: drawn again)
    done = {row["index"]: row["caption"] for row in clip_metrics.read_manifests(out_dir, required=False)
            if all(os.path.exists(os.path.join(out_dir, p)) for p in row["files"])}
    # an edited prompts file: line i's samples there show another caption, and were silently kept as done
    edited = [i for i, c in prompts if i in done and done[i] != c]
    if edited:
        raise ValueError(f"{out_dir} holds samples of other captions for {len(edited)} lines (line indices "
                         f"{edited[:10]}, e.g. {done[edited[0]]!r}): the prompts file changed; use a new --out")
    todo = [(i, c) for i, c in prompts if i % num_shards == shard_index and i not in done]
    # this shard's captions already drawn (`done` holds every shard's: shard 1 is not 'resuming' shard 0's)
    skipped = sum(1 for i, _ in prompts if i % num_shards == shard_index and i in done)
    if gen.model_config.positions == "learned":   # else one such caption failed its whole call, and every rerun
        room = gen.model_config.max_length - gen.vocab.image_tokens_per_image
        too_long = [i for i, c in todo if len(gen.image_prompt(c)) > room]
        if too_long:
            raise ValueError(f"{len(too_long)} captions (line indices {too_long[:10]}) take more than the {room} "
                             f"prompt tokens the model's max_length={gen.model_config.max_length} leaves beside "
                             f"an image's {gen.vocab.image_tokens_per_image}: shorten or remove them")
    manifest = os.path.join(out_dir, "manifest.jsonl" if num_shards == 1 else
                            f"manifest.{shard_index}-of-{num_shards}.jsonl")
    settings_path = os.path.join(out_dir, "settings.json")
    if done and os.path.exists(settings_path):   # resuming: the samples already there must be drawn alike
        with open(settings_path, encoding="utf-8") as f:
            before = json.load(f)
        now = json.loads(json.dumps(settings))
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                   if k not in RESUME_FREE_SETTINGS and before.get(k) != now.get(k)]
        if changed:
            raise ValueError(f"{out_dir} already holds samples drawn with other settings ({'; '.join(changed)}): "
                             "resuming would mix them; use a new --out, or the same settings to resume")
    with open(settings_path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    if os.path.exists(manifest) and os.path.getsize(manifest):   # a line cut by a kill: ours start on a new line
        with open(manifest, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(manifest, "a", encoding="utf-8") as f:
                f.write("\n")
    per_call = max(1, batch_size // max(1, num_samples))   # captions per text_to_image call
    start, written = time.perf_counter(), 0
    logging.info("%d captions to draw (%d already done, shard %d of %d)", len(todo),
                 skipped, shard_index, num_shards)
    for a in range(0, len(todo), per_call):
        chunk = todo[a:a + per_call]
        samples = gen.text_to_image([c for _, c in chunk], batch_size=batch_size, indices=[i for i, _ in chunk],
                                    **kwargs)
        with open(manifest, "a", encoding="utf-8") as f:
            for (index, caption), s in zip(chunk, samples):
                files = []
                for k, image in enumerate(s.images):
                    files.append(os.path.join("images", f"{index:06d}_{k}.png"))
                    image_grid.save_png(os.path.join(out_dir, files[-1]), image)
                f.write(json.dumps({"index": index, "caption": caption, "files": files, "strategies": s.strategies,
                                    "logprobs": s.logprobs.tolist(),
                                    "scores": None if s.scores is None else s.scores.tolist()}) + "\n")
        written += len(chunk)
        elapsed = time.perf_counter() - start
        rate = written / elapsed
        logging.info("captions %d/%d, %.2f captions/s (%.1f images/s), ETA %.0f s", written, len(todo), rate,
                     rate * num_samples, (len(todo) - written) / rate)
    return {"captions": len(todo), "skipped_as_done": skipped, "manifest": manifest}


def write_image_samples(samples: Sequence[ImageSamples], out_dir: str, settings: dict) -> tuple[str, str]:
    """One grid row per caption (best first) and a JSON of settings, scores and strategies."""
    grid = image_grid.make_grid([list(s.images) for s in samples])
    png = image_grid.save_png(os.path.join(out_dir, "samples.png"), grid)
    record = {"settings": settings, "samples": [
        {"caption": s.caption, "strategies": s.strategies, "logprobs": s.logprobs.tolist(),
         "scores": None if s.scores is None else s.scores.tolist()} for s in samples]}
    path = os.path.join(out_dir, "samples.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return png, path


def main(argv):
    del argv
    from absl import flags
    from cm3leon_jax import metrics
    f = flags.FLAGS
    metrics.quiet_library_logs()
    if f["max_images"].present and not f.interleaved:   # read by --interleaved alone: else dropped without a word
        raise ValueError("--max_images caps the images of an --interleaved document: add --interleaved, or drop it")
    if not f.out and workdir_io.is_remote(f.workdir):  # refused before the model loads
        raise ValueError(f"--workdir {f.workdir} is an object-store URL: name a local --out for the samples")
    gen = Generator(f.workdir, step=f.step, vq_workdir=f.vq_workdir, data_dir=f.data_dir, clip_model=f.clip_model,
                    int8=f.int8, compute_dtype=f.compute_dtype)
    try:
        _run(gen, f)
    except vqgan.NoDecoderError as e:
        raise SystemExit(f"generate: {e}") from None


def _run(gen, f):
    """main's body: a prompts file, SFT tasks, image -> text, text infilling or text -> image."""
    if f.question and not f.image:   # else text -> image, infilling or a prompts file ran without a word about it
        raise ValueError("--question asks about --image (image -> text, or --task vqa): give --image, or drop it")
    if f.interleaved and f.task:   # else the task ran and --interleaved was dropped without a word
        raise ValueError(f"--interleaved continues --prompt as mixed-modal documents; --task {f.task} is another "
                         "command: drop one")
    # --cd_k draws every sample by CD-K, or with --cd_fraction only that share (the rest by TopP/TopK/CFG)
    config = sampling.SamplingConfig(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, cfg_scale=f.cfg_scale,
                                     cd_k=0 if f.cd_fraction else f.cd_k, cd_alpha=f.cd_alpha)
    cd_config = sampling.SamplingConfig(temperature=f.temperature, cd_k=f.cd_k or sampling.DEFAULT_CD_K,
                                        cd_alpha=f.cd_alpha)
    settings = {k: getattr(f, k) for k in ("temperature", "top_k", "top_p", "cfg_scale", "cd_k", "cd_alpha",
                                           "cd_fraction", "num_samples", "neighbours", "seed")}
    settings["cd_k"] = cd_config.cd_k if f.cd_fraction else f.cd_k  # the k that drew the CD-K samples
    # what else changes the images: a resumed --prompts_file run must not mix two of them in one directory
    settings.update(workdir=workdir_io.resolve(f.workdir), step=gen.step, int8=gen.int8,
                    compute_dtype=gen.model_config.dtype, vq_workdir=workdir_io.resolve(gen.vq_workdir),
                    data_dir=workdir_io.resolve(gen.data_dir) if gen.data_dir else "",
                    reranker=(gen.clip_scorer.model_dir if gen.clip_scorer is not None
                              else "retriever" if gen.retriever is not None else None) if f.rerank else None)
    out_dir = f.out or os.path.join(f.workdir, "generate")
    # text -> image by CD-K alone (`--cd_k` without --cd_fraction) draws as the CD-K share does: its
    # plausible set replaces TopP/TopK (it applied --top_p/--top_k to the CD-K scores, the share did not)
    t2i_config = cd_config if f.cd_k and not f.cd_fraction else config
    if f.prompts_file:  # many captions -> one PNG per sample, resumable
        if f.prompt or f.image or f.task or f.interleaved:
            raise ValueError("--prompts_file draws text -> image alone: drop --prompt/--image/--task/--interleaved")
        prompts, skipped = read_prompts_file(f.prompts_file)
        if skipped:
            logging.warning("--prompts_file: skipped %s", skipped)
        settings.update(prompts_file=os.path.abspath(f.prompts_file), skipped_lines=skipped, batch_size=f.batch_size)
        summary = generate_many(gen, prompts, out_dir, settings, batch_size=f.batch_size, num_shards=f.num_shards,
                                shard_index=f.shard_index, num_samples=f.num_samples, config=t2i_config,
                                cd_fraction=f.cd_fraction, cd_config=cd_config, num_neighbours=f.neighbours,
                                rerank=f.rerank, seed=f.seed)
        print(json.dumps(summary))
        return
    if f.neighbours and (f.task or f.interleaved or (not f.image and f.prompt and all(MASK0 in p for p in f.prompt))):
        # these paths retrieve nothing: refuse rather than record neighbours that were never used
        raise ValueError("--neighbours applies to text -> image and image -> text only, not to --task, --interleaved "
                         "or text infilling")
    if f.task:  # instruction-tuned tasks (edit, vqa, control, ...): their templates and guidance
        from cm3leon_jax import sft_generate
        sft_generate.run_cli(gen, f)
        return
    if f.image:
        if f.prompt or f.interleaved:   # else silently dropped: the images alone were captioned
            raise ValueError("--image captions images (image -> text; --question asks about them): drop --prompt/"
                             "--interleaved, or name a --task that takes both")
        _refuse_unread_flags(f, "image -> text decodes one text per prompt, with no guidance streams")
        from data_pipeline import images as image_data  # centre crop, alpha onto white: as ingestion
        images = np.stack([image_data.load_image(p, gen.vq.image_size) for p in f.image])
        texts = gen.image_to_text(images, question=f.question, max_tokens=f.max_text_tokens, config=config, seed=f.seed,
                                  num_neighbours=f.neighbours)
        for path, text in zip(f.image, texts):
            print(f"{path}: {text}")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "captions.json"), "w", encoding="utf-8") as fh:
            json.dump({"settings": _settings_read(settings), "question": f.question, "captions": dict(zip(f.image, texts))},
                      fh, indent=2)   # the question is what the texts answer
        return
    if not f.prompt:
        raise ValueError("give --prompt (text -> image or infilling) or --image (image -> text)")
    if f.interleaved:
        # no unconditional stream mid-document, no reranking: guidance and CD-K given were dropped without a
        # word and recorded in interleaved.json as if applied
        _refuse_unread_flags(f, "--interleaved draws without guidance or CD-K", INTERLEAVED_UNREAD)
        settings = _settings_read(settings, INTERLEAVED_UNREAD)
        write_interleaved(gen, f.prompt, out_dir, settings, num_samples=f.num_samples, max_images=f.max_images,
                          max_text_tokens=f.max_text_tokens, batch_size=f.batch_size, image_config=dataclasses.replace(config, cfg_scale=1.0, cd_k=0), seed=f.seed)
        return
    if any(MASK0 in p for p in f.prompt) and not all(MASK0 in p for p in f.prompt):
        # else the infilling prompts would be drawn as captions, their sentinel as caption text
        raise ValueError(f"--prompt: either every prompt infills (holds {MASK0}) or none does; run them separately")
    if all(MASK0 in p for p in f.prompt):
        _refuse_unread_flags(f, "text infilling decodes one text per prompt, with no guidance streams")
        for p in f.prompt:
            print(f"{p} -> {gen.infill_text(p, max_tokens=f.max_text_tokens, config=config, seed=f.seed)}")
        return
    samples = gen.text_to_image(f.prompt, num_samples=f.num_samples, config=t2i_config, cd_fraction=f.cd_fraction,
                                cd_config=cd_config, num_neighbours=f.neighbours, rerank=f.rerank, seed=f.seed,
                                batch_size=f.batch_size)
    png, path = write_image_samples(samples, out_dir, settings)
    logging.info("wrote %s and %s", png, path)
    print(png)


# what --interleaved does not read: one stream, no CD-K (`Generator.interleaved`)
INTERLEAVED_UNREAD = ("cfg_scale", "cd_k", "cd_alpha", "cd_fraction")
# what a one-stream text decode (image -> text, infilling) does not read: guidance and CD-K need
# several streams, sample counts and their share several samples
ONE_STREAM_UNREAD = ("cfg_scale", "cd_k", "cd_alpha", "cd_fraction", "num_samples")


def _refuse_unread_flags(f, why: str, unread=ONE_STREAM_UNREAD) -> None:
    """Refuses flags of `unread` given on the command line, which the path `why` describes would
    ignore without a word (their defaults, e.g. --cfg_scale 3 for text -> image, pass)."""
    given = [f"--{k}" for k in unread if f[k].present]
    if given:
        raise ValueError(f"{why}: {', '.join(given)} would be ignored; drop it")


def _settings_read(settings: dict, unread=ONE_STREAM_UNREAD) -> dict:
    """The settings a path reads (default: a one-stream text decode, image -> text): recording
    guidance, CD-K, sample counts or a reranker it never applies would claim what was not done."""
    return {k: v for k, v in settings.items() if k not in unread + ("reranker",)}


def _define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "training workdir (checkpoints, config.json, vocab/) or params bundle",
                        required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_string("vq_workdir", None, "VQ tokenizer workdir (default: the bundle's, else the data's)")
    flags.DEFINE_string("data_dir", None, "data dir for retrieval (default: the config's; '' for none)")
    flags.DEFINE_multi_string("prompt", [], "caption(s) for text -> image, or text with <mask:0> to infill")
    flags.DEFINE_multi_string("image", [], "image path(s) for image -> text")
    flags.DEFINE_string("question", None, "a question about the image (image -> text)")
    flags.DEFINE_integer("num_samples", 8, "images per prompt (--interleaved: documents per prompt)", lower_bound=1)
    flags.DEFINE_float("cfg_scale", 3.0, "classifier-free guidance scale (1 = off); text outputs (--image, "
                      "infilling) decode one stream, without guidance")
    flags.DEFINE_float("temperature", 1.0, "0 = greedy")
    flags.DEFINE_integer("top_k", 0, "0 = off", lower_bound=0)
    flags.DEFINE_float("top_p", 0.9, "1 = off")
    flags.DEFINE_integer("cd_k", 0, "contrastive decoding TopK: k for all samples, or with --cd_fraction for that "
                         f"share (0: off, or k={sampling.DEFAULT_CD_K} with --cd_fraction)", lower_bound=0)
    flags.DEFINE_float("cd_alpha", 0.1, "CD-K plausibility threshold")
    flags.DEFINE_float("cd_fraction", 0.0, "share of samples drawn by CD-K (the paper mixes half and half)")
    flags.DEFINE_integer("neighbours", 0, "retrieved documents prepended to the prompt (0, 1 or 2)", lower_bound=0)
    flags.DEFINE_bool("rerank", True, "sort samples by similarity to the prompt (--clip_model's, else the retriever's)")
    flags.DEFINE_string("clip_model", None, "local Hugging Face CLIP checkpoint dir (safetensors) to rerank with, as "
                        "the paper does (needs the interop extra); default: the data's retriever")
    flags.DEFINE_integer("max_text_tokens", 48, "limit for generated text", lower_bound=1)
    flags.DEFINE_bool("interleaved", False, "mixed-modal continuation of --prompt: text and images in turn "
                      "(Generator.interleaved; images by --top_p/--top_k/--temperature, text greedy)")
    flags.DEFINE_integer("max_images", 2, "--interleaved: images at most")
    flags.DEFINE_string("prompts_file", None, "captions, one per line (.txt) or {\"caption\": ...} per line (.jsonl): "
                        "every sample written as OUT/images/INDEX_K.png with a manifest.jsonl; rerun to resume")
    flags.DEFINE_integer("batch_size", 16, "images (--interleaved: documents) decoded together per call, with their "
                         "guidance streams (16 suits a CPU; raise it on a GPU or TPU: bench/text_to_image.py)")
    flags.DEFINE_integer("num_shards", 1, "--prompts_file: split the captions over this many processes", lower_bound=1)
    flags.DEFINE_integer("shard_index", 0, "--prompts_file: this process's shard (captions with index % num_shards)",
                         lower_bound=0)
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_bool("int8", False, "int8 weight-only kernels (a quarter of the weight memory; quantization.py)")
    flags.DEFINE_enum("compute_dtype", None, list(COMPUTE_DTYPES), "activations and KV cache dtype for decoding "
                      "(default: the training config's; bfloat16 on an accelerator)")
    flags.DEFINE_string("out", None, "output directory (default WORKDIR/generate)")
    flags.DEFINE_enum("task", None, ["text_to_image", "caption", "vqa", "edit", "control", "segment", "infill"],
                      "an instruction-tuning task: --image fills its images, --prompt / --question its text")
    flags.DEFINE_float("image_cfg_scale", 1.5, "image guidance of three-stream CFG (--task edit/control/infill)")
    flags.DEFINE_enum("control_type", None, ["edge", "segmentation"], "--task control: the kind of control map")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
