"""Layer importance: criteria (grad_x_act, l1, random), objectives, and the jitted statistics pass."""
