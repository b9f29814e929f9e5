"""Running a recipe: the strict recipe schema, what a pass receives, the cached step runner, resource monitor."""
