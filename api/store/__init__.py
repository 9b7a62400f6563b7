"""Stores: one interface (``base.Store``), two implementations (embedded SQLite file, MongoDB)."""
