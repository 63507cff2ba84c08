"""merv.pipelines."""
