"""Benchmark suites: load and validate prompts/*.yaml, extract relation predicates."""

from .loader import SuiteError, available_suites, load_suite, parse_suite, prompts_dir
from .model import Case, Subject, Suite, find_phrase
from .predicates import extract_predicate, predicate_backend

__all__ = ["Case", "Subject", "Suite", "SuiteError", "find_phrase", "available_suites", "extract_predicate", "predicate_backend", "load_suite", "parse_suite", "prompts_dir"]
