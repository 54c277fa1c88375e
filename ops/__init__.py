"""Kernels and the ops the models call. Imports nothing from the rest of the project."""
