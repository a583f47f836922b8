"""What a route is: labels -> specs (pure), model, transformations and the immutable route table."""
