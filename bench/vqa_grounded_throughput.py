"""The metrics beyond CLIP (issue 14): the family scorers' images/s against their raw model forward.

One function per family measures, on the same machine, device, dtype and batch size:
  prepare  the scorer's CPU part alone (resize, chat template, processor) in one thread: the
           most images/s any device can get out of the scorer, since score() overlaps it
           with the forward but runs it in one worker thread;
  raw      the model's forward alone on inputs preprocessed once beforehand (already on the
           device), after a warm-up batch;
  scorer   the family scorer's `score(items)` on decoded images (resize, chat template or
           detector queries, processor, forward, read-out), after a warm-up call.
The issue's target: the scorer at least half the raw rate. Images are RelationBench cases
(single and multi alternating) drawn as photo-like pictures of --size px, what `relbench
score` hands the scorers after decoding (decoding and caching are score.py's, measured by
bench/score_throughput.py).

    vqa       VQAScorer (metrics/vqa.py): vqa_t and vqa_r, two questions per image with a
              predicate. --arch tiny: the tiny backbone's Qwen2.5-VL; --arch qwen2.5-vl-3b:
              Qwen2.5-VL-3B-Instruct's architecture at full size with random weights (speed
              does not depend on weight values) and the tiny tokenizer (ids are all that matter).

    grounded  GroundedScorer (metrics/grounded.py): OWLv2 on the images and class nouns, crops,
              their CLIP and DINO. --arch tiny: the tiny backbone's models; --arch owlv2-base:
              OWLv2 base/16 at 960 px, CLIP ViT-B/32 and DINO ViT-S/16 at full size with random
              weights (random boxes: they change only what the crops cost).

    python bench/vqa_grounded_throughput.py --family vqa --arch tiny --images 32 --batch-size 8
    python bench/vqa_grounded_throughput.py --family vqa --arch qwen2.5-vl-3b --device cuda --dtype bf16
    python bench/vqa_grounded_throughput.py --family vqa --arch qwen2.5-vl-3b --device meta   # prepare only
    python bench/vqa_grounded_throughput.py --family grounded --arch owlv2-base --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from score_throughput import full_size_encoders, photo_like, pick_cases  # noqa: E402  (bench/ is the script's folder)


@dataclass
class Row:
    family: str
    model: str
    device: str
    dtype: str
    batch: int
    images: int
    prepare_ips: float  # images per second through the scorer's CPU part alone (one thread)
    scorer_ips: float  # images per second through the family scorer (NaN: not measured)
    raw_ips: float  # images per second through the raw forward (NaN: not measured)

    def markdown(self) -> str:
        def rate(x: float) -> str:
            return "not measured" if math.isnan(x) else f"{x:.2f}"

        return (f"| {self.family} | {self.model} | {self.device} | {self.dtype} | {self.batch} | {self.images} | "
                f"{rate(self.prepare_ips)} | {rate(self.scorer_ips)} | {rate(self.raw_ips)} | "
                f"{rate(self.scorer_ips / self.raw_ips)} |")


HEADER = ("| family | model | device | dtype | batch | images | prepare img/s | scorer img/s | raw img/s "
          "| scorer / raw |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _images_per_s(device: str, images: int, warm_up, run) -> float:
    """`images` / the seconds of `run()`, after `warm_up()`; the device synchronized around it."""
    warm_up()
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return images / (time.perf_counter() - start)


def _items(n: int, size: int):
    from relationbench.metrics.registry import ImageItem

    _, cases = pick_cases(n)
    return [ImageItem(image=photo_like(size, j), sha256=f"{j:064x}", case=case, text=case.prompt,
                      predicate=case.predicate, uses_layout=True) for j, (case, _) in enumerate(cases)]


# --------------------------------------------------------------------------- vqa

QWEN25_VL_3B = dict(  # Qwen/Qwen2.5-VL-3B-Instruct's config.json: the fields that shape the network
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
              rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
)


def _vqa_scorer(arch: str, device: str, dtype, batch: int, workers: int):
    """The VQAScorer of `arch`: the tiny backbone's, or Qwen2.5-VL-3B's shape with random weights."""
    import torch

    from relationbench.backbones import get_backbone
    from relationbench.metrics.vqa import VQAScorer, VQASettings, build_tiny_vqa, load_vqa_scorer

    settings = VQASettings(batch_size=batch, workers=workers)
    if arch == "tiny":
        return load_vqa_scorer(get_backbone("tiny"), device, dtype, settings)
    if arch != "qwen2.5-vl-3b":
        raise SystemExit(f"vqa: --arch tiny or qwen2.5-vl-3b, not {arch!r}")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tiny, processor = build_tiny_vqa()  # its tokenizer and chat template; the real image processor
    processor.image_processor = Qwen2VLImageProcessor()
    cfg = tiny.config
    config = Qwen2_5_VLConfig(
        text_config=dict(QWEN25_VL_3B["text"], bos_token_id=cfg.text_config.bos_token_id,
                         eos_token_id=cfg.text_config.eos_token_id),
        vision_config=QWEN25_VL_3B["vision"], image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    return VQAScorer(model, processor, f"random:{arch}", device, dtype, settings)


def vqa_rows(args) -> list[Row]:
    """VQAScorer.score against model(**inputs) on the same (image, question) pairs, preprocessed once."""
    from relationbench.metrics.vqa import relation_text

    scorer = _vqa_scorer(args.arch, args.device, args.dtype, args.batch_size, args.workers)
    items = _items(args.images, args.size)
    pairs = [(item.image, item.text) for item in items]
    pairs += [(item.image, text) for item in items if (text := relation_text(item.case, item.predicate))]
    size = scorer.settings.batch_size
    scorer.prepare([pairs[0][0]], [pairs[0][1]])  # warm-up (template compilation)
    start = time.perf_counter()
    resized = {id(im): scorer.resize(im) for im, _ in pairs}  # once per image, as score() does
    batches = [scorer.prepare([resized[id(im)] for im, _ in pairs[s:s + size]], [t for _, t in pairs[s:s + size]])
               for s in range(0, len(pairs), size)]
    prepared = len(items) / (time.perf_counter() - start)
    name = scorer.id if args.arch == "tiny" else args.arch
    if args.device == "meta":  # the CPU part only (the model has no weights to run)
        return [Row("vqa", name, args.device, args.dtype_name, size, len(items), prepared, math.nan, math.nan)]
    raw = _images_per_s(args.device, len(items), lambda: scorer.forward(batches[0]),
                        lambda: [scorer.forward(inputs) for inputs in batches])
    scored = _images_per_s(args.device, len(items), lambda: scorer.score(items[:size]), lambda: scorer.score(items))
    return [Row("vqa", name, args.device, args.dtype_name, size, len(items), prepared, scored, raw)]


# --------------------------------------------------------------------------- grounded


def grounded_rows(args) -> list[Row]:
    """GroundedScorer.score (processor, OWLv2 forward, box read-out, crops, their CLIP and DINO
    preprocessing and forwards, scores) against the models' forwards alone: OWLv2 on the same
    images and queries and CLIP and DINO on the same crops, all preprocessed once beforehand.
    The tiny backbone's detector and encoders (--arch tiny), or google/owlv2-base-patch16's
    architecture at 960 px with CLIP ViT-B/32 and DINO ViT-S/16 at full size, random weights
    (--arch owlv2-base; boxes are random then, which changes only what the crops cost);
    the subjects' references are embedded beforehand, as score.py caches them."""
    import numpy as np

    from relationbench.backbones import get_backbone
    from relationbench.metrics.encoders import load_clip, load_dino
    from relationbench.metrics.grounded import assign_boxes, crop_box, embed_with, load_grounded_scorer, query_nouns
    from relationbench.metrics.protocols import get_protocol

    backbone = get_backbone("tiny")
    if args.arch == "tiny":
        clip, dino = (load(backbone, device=args.device, dtype=args.dtype) for load in (load_clip, load_dino))
    elif args.arch == "owlv2-base":
        clip, dino = _full_size_encoders(args.device, args.dtype)
    else:
        raise SystemExit(f"grounded: --arch tiny or owlv2-base, not {args.arch!r}")
    embed = embed_with(clip, dino)
    items = _items(args.images, args.size)
    names = sorted({s.name for it in items for s in it.case.subjects})
    refs = dict(zip(names, (embed([photo_like(256, 1000 + j) for j in range(3)]) for _ in names)))
    if args.arch == "tiny":
        scorer = load_grounded_scorer(backbone, embed, lambda s: refs[s.name], get_protocol("paper").image_scale,
                                      args.device, args.dtype)
    else:
        from relationbench.metrics.grounded import GroundedScorer

        scorer = GroundedScorer(_full_size_owl(args.device, args.dtype), embed, lambda s: refs[s.name],
                                get_protocol("paper").image_scale)
    size = args.batch_size
    chunks = [items[s:s + size] for s in range(0, len(items), size)]
    start = time.perf_counter()
    batches = [scorer.detector.prepare([it.image for it in c], [query_nouns(it.case) for it in c]) for c in chunks]
    prepared = len(items) / (time.perf_counter() - start)
    crops = []  # per chunk: (CLIP pixels, DINO pixels) of the crops the scorer embeds
    for chunk in chunks:
        k = max(len(it.case.subjects) for it in chunk)
        found = scorer.detector.candidates([it.image for it in chunk], [query_nouns(it.case) for it in chunk], k)
        cut = [crop_box(it.image, d.box) for it, f in zip(chunk, found)
               for d in assign_boxes(it.case, f, it.uses_layout) if d is not None]
        crops.append(tuple(np.stack([e.preprocess(c) for c in cut]) if cut else None for e in (clip, dino)))

    def raw_forward(inputs, pixels) -> None:
        scorer.detector.forward(inputs)
        for encoder, x in zip((clip, dino), pixels):
            if x is not None:
                encoder.encode_images(x)

    raw = _images_per_s(args.device, len(items), lambda: raw_forward(batches[0], crops[0]),
                        lambda: [raw_forward(inputs, pixels) for inputs, pixels in zip(batches, crops)])
    scored = _images_per_s(args.device, len(items), lambda: scorer.score(chunks[0]),
                           lambda: [scorer.score(chunk) for chunk in chunks])
    return [Row("grounded", scorer.id, args.device, args.dtype_name, size, len(items), prepared, scored, raw)]


def _full_size_owl(device: str, dtype):
    """OWLv2 base/16 at 960 px (google/owlv2-base-patch16-ensemble's shape), random weights,
    with the offline CLIP tokenizer (ids are all that matter for speed)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    from relationbench.metrics.detector import OWL_QUERY_LENGTH, OwlDetector, offline_owl_processor

    config = Owlv2Config(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=OWL_QUERY_LENGTH),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=960, patch_size=16),
        projection_dim=512)
    return OwlDetector("random:owlv2-base-patch16", Owlv2ForObjectDetection(config), offline_owl_processor(960),
                       device, dtype)


def _full_size_encoders(device: str, dtype):
    """score_throughput's CLIP ViT-B/32 (open_clip) and DINO ViT-S/16 at full size, random weights,
    as the metric encoders."""
    import open_clip

    from relationbench.metrics.encoders import ClipEncoder, DinoEncoder
    from relationbench.metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS

    clip, dino = (model.to(device, dtype) for model in full_size_encoders())
    return (ClipEncoder("random:clip-ViT-B-32", CLIP_PREPROCESS, clip, device, dtype,
                        tokenizer=open_clip.tokenizer.SimpleTokenizer()),
            DinoEncoder("random:dino-vits16", DINO_PREPROCESS, dino, device, dtype))


# --------------------------------------------------------------------------- main

FAMILIES = {"vqa": vqa_rows, "grounded": grounded_rows}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: all")
    parser.add_argument("--arch", default="tiny", help="vqa: tiny | qwen2.5-vl-3b; grounded: tiny | owlv2-base")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024, help="side of the generated images (px)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4, help="vqa: the scorer's threads preparing batches ahead")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | meta (builds the model without "
                        "weights and times only the CPU part: how fast a GPU may go before it waits)")
    parser.add_argument("--dtype", dest="dtype_name", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.device}")
    print(HEADER)
    for family in args.family or sorted(FAMILIES):
        for row in FAMILIES[family](args):
            print(row.markdown(), flush=True)


if __name__ == "__main__":
    main()
