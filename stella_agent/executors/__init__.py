"""Executors: the code that carries out tasks against Docker Engine and Compose."""
