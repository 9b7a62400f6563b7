"""Example user code: tasks written against the public interface, as a user would."""
