"""Shipped training recipes: specs with stages and data (`mmhub train NAME`)."""
