"""Test doubles (fault injection, fakes); production code never imports this package."""
