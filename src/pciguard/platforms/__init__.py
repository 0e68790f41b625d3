"""Platforms the toolstack runs on. ``base`` holds the one protocol they share."""
