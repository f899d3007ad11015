"""Tests for the generation engine and the multi-process pipeline."""
