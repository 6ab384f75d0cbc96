"""Placeholder until its owner fills it in."""


def register(app):
    return None
