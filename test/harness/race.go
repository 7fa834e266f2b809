//go:build race

package harness

// raceEnabled is true when the tests run with -race: then the daemons under
// test are built with -race too, and a race they report fails the test.
const raceEnabled = true
