"""Strata: continual instruction tuning of vision-language models on Ray."""
