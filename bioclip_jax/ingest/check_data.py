"""Reads every sample of some shards once and reports what training would skip.

The report gives the number of samples, how many are usable, the skipped ones by reason
(the same reasons and rules as the training pipeline, with example keys: captions that
are not valid UTF-8 count as corrupt_caption), damaged shards, which caption types are
present, and the number of distinct taxa per rank (parsed from `taxonTag.txt`, else from
a full seven-word `taxonomic_name.txt`). With a text type a sample also needs the
caption(s) that type can choose; without one, any one caption will do.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Mapping

import numpy as np
import tqdm

from bioclip_jax.data import decode
from bioclip_jax.data.pipeline import (SKIP_REASONS, SkippedSample, caption_member, caption_text,
                                       open_sample_source, usable_parts)
from bioclip_jax.taxonomy import CAPTION_FILES, RANKS, Taxon, TextTypeSampler

CHECK_SIZE = 32  # decoding to a small crop is cheap (JPEG draft mode) and still reads every scan
_IN_FLIGHT = 1024


def _parse_tagged(text: str) -> Taxon | None:
    """"a photo of kingdom Animalia phylum Chordata ... species corax." -> Taxon."""
    text = text.removeprefix("a photo of ").rstrip(".").split(" with common name ")[0]
    ranks: dict[str, list[str]] = {}
    current = None
    for word in text.split():
        if word in RANKS and word not in ranks:
            current = ranks.setdefault(word, [])
        elif current is not None:
            current.append(word)
    if not ranks:
        return None
    return Taxon.from_ranks(**{rank: " ".join(words) for rank, words in ranks.items()})


def taxon_of(raw: Mapping[str, Any]) -> tuple[Taxon, str] | None:
    """The sample's taxonomy and the member it was read from (best effort)."""
    try:
        tagged = caption_text(raw, "taxonTag.txt")
        if tagged and (taxon := _parse_tagged(tagged)) is not None:
            return taxon, "taxonTag.txt"
        words = caption_text(raw, "taxonomic_name.txt").split()
        if len(words) == len(RANKS):
            return Taxon.from_ranks(**dict(zip(RANKS, words))), "taxonomic_name.txt"
    except (TypeError, ValueError, SkippedSample):
        pass
    return None


def caption_problem(raw: Mapping[str, Any], extension: str) -> str | None:
    """"missing_caption" (absent or empty), "corrupt_caption" (not UTF-8), or None for a usable caption."""
    try:
        return None if caption_text(raw, extension) else "missing_caption"
    except SkippedSample as skip:
        return skip.reason


def skip_reason(raw: Mapping[str, Any], required: list[str]) -> str | None:
    """Why training would skip this sample (None if it would not)."""
    try:
        image, _ = usable_parts(raw, None)
    except SkippedSample as skip:
        return skip.reason
    problems = [caption_problem(raw, ext) for ext in required or CAPTION_FILES]
    if required and any(problems):
        return next(problem for problem in problems if problem)
    if not required and all(problems):  # any one caption will do; report the worst
        return "corrupt_caption" if "corrupt_caption" in problems else "missing_caption"
    try:
        decode.decode_and_crop(image, CHECK_SIZE, np.random.default_rng(0))
    except decode.ImageDecodeError:
        return "corrupt_image"
    return None


def _inspect(source, index: int, required: list[str]):
    raw = source[index]
    present = tuple(name for ext, name in CAPTION_FILES.items() if caption_problem(raw, ext) is None)
    return raw.get("__key__"), skip_reason(raw, required), present, taxon_of(raw)


def required_captions(text_type: str | None) -> list[str]:
    """The caption members a text-type spec may pick from (all of them must be present)."""
    if text_type is None:
        return []
    return [caption_member(name) for name in TextTypeSampler(text_type).types]


def _in_order(function, count: int, threads: int):
    """function(0..count-1) on a thread pool, yielded in order, with a bounded number in flight."""
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        pending: collections.deque = collections.deque()
        for index in range(count):
            pending.append(pool.submit(function, index))
            if len(pending) >= _IN_FLIGHT:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def check_data(shards: Any, text_type: str | None = None, examples: int = 5, threads: int = 4,
               cache_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring)."""
    required = required_captions(text_type)
    source = open_sample_source(shards, cache_dir)
    skipped = {reason: {"count": 0, "examples": []} for reason in SKIP_REASONS}
    type_counts = {name: 0 for name in CAPTION_FILES.values()}
    lineages: dict[str, set] = {rank: set() for rank in RANKS}
    taxon_members: set[str] = set()
    results = _in_order(lambda i: _inspect(source, i, required), len(source), threads)
    for key, reason, present, taxon in tqdm.tqdm(results, total=len(source), desc="checking samples",
                                                unit="sample", disable=not progress):
        if reason is not None:
            skipped[reason]["count"] += 1
            if len(skipped[reason]["examples"]) < examples:
                skipped[reason]["examples"].append(key)
        for name in present:
            type_counts[name] += 1
        if taxon is not None:
            taxon_members.add(taxon[1])
            for rank in RANKS:
                lineage = taxon[0].lineage(rank)
                if lineage[-1]:
                    lineages[rank].add(lineage)
    total_skipped = sum(entry["count"] for entry in skipped.values())
    return {
        "shards": len(getattr(source, "shard_paths", [])),
        "samples": len(source),
        "usable": len(source) - total_skipped,
        "skipped": skipped,
        "shard_problems": dict(getattr(source, "problems", {})),
        "text_type": text_type,
        "text_types_present": type_counts,
        "taxa_per_rank": {rank: len(found) for rank, found in lineages.items()},
        "taxa_parsed_from": sorted(taxon_members),
    }


def format_report(report: Mapping[str, Any]) -> str:
    samples = report["samples"]
    share = report["usable"] / samples if samples else 0.0
    lines = [f"shards:  {report['shards']} ({len(report['shard_problems'])} damaged or unreadable)",
             f"samples: {samples}",
             f"usable:  {report['usable']} ({share:.2%})"
             + (f" for text type {report['text_type']}" if report["text_type"] else ""),
             "skipped by reason:"]
    for reason, entry in report["skipped"].items():
        shown = f"  e.g. {', '.join(map(str, entry['examples']))}" if entry["examples"] else ""
        lines.append(f"  {reason:<17} {entry['count']:>9}{shown}")
    lines += [f"  {path}: {problem}" for path, problem in report["shard_problems"].items()]
    present = ", ".join(f"{name} {count}" for name, count in report["text_types_present"].items() if count)
    lines.append(f"text types present (samples with a non-empty caption): {present or 'none'}")
    source = " / ".join(report["taxa_parsed_from"]) or "no parsable taxonomy members"
    ranks = ", ".join(f"{rank} {count}" for rank, count in report["taxa_per_rank"].items())
    lines.append(f"distinct taxa per rank (from {source}): {ranks}")
    return "\n".join(lines)


def passes(report: Mapping[str, Any], max_bad_fraction: float = 0.0) -> bool:
    """At most `max_bad_fraction` of the samples unusable, at least one sample, and no damaged shard."""
    bad = report["samples"] - report["usable"]
    too_many = bad > max_bad_fraction * report["samples"] or report["samples"] == 0
    return not too_many and not report["shard_problems"]
