"""Turning predictions into the numbers the paper reports."""
