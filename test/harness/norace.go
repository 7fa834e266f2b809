//go:build !race

package harness

// raceEnabled is true when the tests run with -race; see race.go.
const raceEnabled = false
